"""Fine-tuning (tamper) attack: fine-tune a COPY of the defended model on N request/response pairs, then ask
directly (docs/method.md section 13: a defence that a few dozen harmful examples undo protects only against
users who cannot fine-tune).

For each N in `ns` (default 0, 10, 50, 200) a copy of the model gets `steps` optimiser steps (AdamW, `lr`) of
LoRA (default: rank 8 on every linear layer) or full fine-tuning on the first N pairs of the attacker's data
(a fixed shuffle, so the N=10 set is inside the N=50 set), then the direct request is asked of every behaviour
(greedy, as the `direct` attack; N=0 is exactly the direct attack). The given model is never changed.

The attacker's data is the held-out harmful split answered by the original model
(data/generated/<data_model>/harmful.test.jsonl): harmful.train is the circuit breaker's training set, and the
built-in behaviours are the requests of that same held-out split, so every request of the behaviours under
attack is removed from it (compared after normalising case and spaces). `data: benign` fine-tunes on
the held-out benign answers instead (benign.test.jsonl; never seen in training: does ordinary fine-tuning
erode the breaker?). Where fewer pairs are left than N, all of them are used, a warning says so and
`extra["examples"]` records the count.

The harness needs one attack name per result, so `split()` gives one attack per N, named `finetune-N`
(`finetune_benign-N`); EvalConfig.make_attacks expands them, and each records its own budget (`ns: [N]`).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..generation import chat_prompt
from ._common import conversation, model_device
from .base import AttackOutput, Behavior, budget_of, refuse_images
from .direct import DirectConfig, DirectRequest

METHODS = ("lora", "full")
DATA = ("harmful", "benign")


@dataclass
class FineTuneConfig:
    """Small by default (a CPU can afford it): 20 steps of LoRA r8 at lr 1e-3, 4 pairs a step, 256 tokens."""

    ns: tuple[int, ...] = (0, 10, 50, 200)  # attacker data sizes: one result (a recovery-curve point) per N
    steps: int = 20  # optimiser steps per N (the same budget for every N > 0)
    lr: float = 1e-3  # AdamW; 1e-3 suits LoRA, full fine-tuning wants ~1e-5
    method: str = "lora"  # lora or full
    lora_r: int = 8
    lora_alpha: int = 16
    train_batch_size: int = 4
    max_length: int = 256  # tokens per training pair (prompt + response), cut on the right
    data: str = "harmful"  # harmful or benign (benign-only fine-tuning)
    data_model: str = "smollm2-135m"  # whose answers: data/generated/<data_model>/
    seed: int = 0  # data order and LoRA init
    max_new_tokens: int = 256
    batch_size: int = 16  # generation batch
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.data not in DATA:
            raise ValueError(f"data: expected one of {', '.join(DATA)}, got {self.data!r}")
        if not self.ns or any(n < 0 for n in self.ns) or len(set(self.ns)) != len(self.ns):
            raise ValueError(f"ns: expected distinct non-negative integers, got {list(self.ns)}")
        for key in ("steps", "train_batch_size", "max_length", "lora_r", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr}")


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", (text or "").strip().lower())


def attacker_data(config: FineTuneConfig, behaviors: Sequence[Behavior]) -> list:
    """The attacker's pairs (Examples), in a fixed shuffled order, none with a request of `behaviors`."""
    import random

    from ..data.builtin import generated_set

    pool = list(generated_set(config.data, "test", config.data_model))
    random.Random(config.seed).shuffle(pool)  # before filtering: leaving a request out keeps the others' order
    evaluated = {_normal(t) for b in behaviors for t in (b.request, b.user_message())}
    return [e for e in pool if e.request and _normal(e.request) not in evaluated and e.response.strip()]


def _tokenized(tokenizer, examples, config: FineTuneConfig) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per pair: the chat prompt masked (-100), the response and end-of-sequence learned."""
    items = []
    eos = tokenizer.eos_token or ""
    for e in examples:
        prompt = chat_prompt(tokenizer, conversation(e.request, config.system_prompt))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + e.response + eos, add_special_tokens=False)["input_ids"][:config.max_length]
        labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
        if any(label != -100 for label in labels):
            items.append((full_ids, labels))
    return items


def fine_tune(model, tokenizer, examples, config: FineTuneConfig):
    """A fine-tuned copy of `model` (LoRA merged, or fully trained), in eval mode; `model` is left as it was."""
    from peft import LoraConfig, get_peft_model

    items = _tokenized(tokenizer, examples, config)
    if examples and not items:
        raise ValueError(f"finetune: max_length {config.max_length} leaves no response token of any attacker pair "
                         "to learn (the prompts alone are longer); raise max_length")
    tuned = copy.deepcopy(model)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        if config.method == "lora":
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                              target_modules="all-linear", task_type="CAUSAL_LM")
            tuned = get_peft_model(tuned, lora)
        else:
            for p in tuned.parameters():
                p.requires_grad_(True)
        params = [p for p in tuned.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(config.seed)
        tuned.train()
        order: list[int] = []
        for _ in range(config.steps if items else 0):
            batch = []
            while len(batch) < min(config.train_batch_size, len(items)):
                if not order:
                    order = torch.randperm(len(items), generator=generator).tolist()
                batch.append(items[order.pop()])
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
            loss = tuned(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune: non-finite loss {loss.item()} (lower lr, now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if config.method == "lora":
            tuned = tuned.merge_and_unload()
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return tuned


class FineTune:
    """LoRA or full fine-tuning of a copy on N attacker pairs, then the direct request (one result per N)."""

    name = "finetune"
    config_class = FineTuneConfig
    takes_images = False

    def __init__(self, config: FineTuneConfig | None = None):
        self.config = config or self.config_class()
        self.family = self.name  # the registry name, also after split()
        self.excluded: dict[str, Behavior] = {}  # behaviours whose requests the attacker's data must not hold
        self._shared: dict = {"tuned": None}  # (key, copy): one fine-tuned copy at a time, shared by split() parts

    def exclude(self, behaviors: Sequence[Behavior]) -> None:
        """Keep these behaviours' requests out of the attacker's data (the pipeline passes every behaviour of the
        run before the harness attacks them chunk by chunk); `run` adds the behaviours it is given too."""
        self.excluded.update({b.id: b for b in behaviors})

    def split(self) -> list["FineTune"]:
        """One attack per N, named `<family>-N`, each with `ns=(N,)`: what the harness scores and reports. The
        parts share the exclusions and the cached copy (one copy in memory at a time)."""
        parts = []
        for n in self.config.ns:
            part = type(self)(replace(self.config, ns=(n,)))
            part.name, part.family, part.excluded, part._shared = f"{self.family}-{n}", self.family, \
                self.excluded, self._shared
            parts.append(part)
        return parts

    def data(self, n: int) -> list:
        """The first n attacker pairs with every excluded behaviour's request left out."""
        return attacker_data(self.config, list(self.excluded.values()))[:n]

    def _tuned(self, model, tokenizer, n: int):
        """(the fine-tuned copy for N, the pairs it was trained on); the harness's chunks reuse it while the
        model and the data stay the same."""
        examples = self.data(n)
        if len(examples) < n:
            warnings.warn(f"{self.name}: only {len(examples)} attacker pairs are left after removing the "
                          f"evaluated behaviours; training on {len(examples)}, not {n}")
        key = (id(model), self.config, tuple(e.request for e in examples))
        cached = self._shared["tuned"]
        if cached is not None and cached[0] == key:
            return cached[1], examples
        self._shared["tuned"] = None  # free the previous copy before making the next
        tuned = fine_tune(model, tokenizer, examples, self.config)
        self._shared["tuned"] = (key, tuned)
        return tuned, examples

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        refuse_images(self.name, behaviors)  # the attacker's pairs and the fine-tune are text-only
        self.exclude(behaviors)
        outputs = []
        for n in self.config.ns:
            name = self.name if len(self.config.ns) == 1 else f"{self.family}-{n}"
            if n == 0:
                tuned, used = model, []
            else:
                tuned, used = self._tuned(model, tokenizer, n)
            direct = DirectRequest(DirectConfig(max_new_tokens=self.config.max_new_tokens,
                                                batch_size=self.config.batch_size,
                                                system_prompt=self.config.system_prompt))
            for o in direct.run(tuned, tokenizer, behaviors):
                extra = {**o.extra, "n": n, "examples": len(used), "data": self.config.data,
                         "data_source": f"generated/{self.config.data_model}/{self.config.data}.test.jsonl"}
                outputs.append(AttackOutput(o.behavior_id, name, o.prompt, o.generations,
                                            budget_of(replace(self.config, ns=(n,))), extra))
        return outputs


@dataclass
class FineTuneBenignConfig(FineTuneConfig):
    """The `finetune` budget on benign-only data (held-out benign answers of the original model)."""

    data: str = "benign"


class FineTuneBenign(FineTune):
    name = "finetune_benign"
    config_class = FineTuneBenignConfig
