"""The RR training loop, top to bottom (Algorithm 1 of the paper; method.md sections 3-5).

Each optimizer step draws one circuit-breaker batch and one retain batch, independently, each
padded to its own longest item. For each it runs a no-grad pass with the LoRA adapter disabled
(the "original" model: the same weights, never a second copy) and a pass with gradients, both
through the decoder only (no LM head) and keeping only the hidden states the losses need. Then
`c_s(t) * L_s + c_r(t) * L_r` is minimised with AdamW; t counts optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from . import losses
from .config import ConfigError, RRConfig, atomic_write_text
from .data import ChatFormatter, TokenizedExample, collate, tokenize_examples
from .data.builtin import load_training_sets
from .hidden import decoder_hidden_states
from .models import Architecture, DroppedBlocks, base_model_name, drop_blocks_after, find_architecture, load_model, unwrap


# ---------------------------------------------------------------- batches


def batch_indices(lengths: Sequence[int], batch_size: int, seed: int, *, group_by_length: bool = True
                  ) -> Iterator[list[int]]:
    """Endless batches of item indices. Every item is drawn once per epoch (the reference could only
    ever draw the first min(|D_s|, |D_r|) retain items). With `group_by_length`, items of similar
    length share a batch (sorted within random windows of 50 batches), so less padding is computed."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        epoch = list(range(len(lengths)))
        rng.shuffle(epoch)
        if group_by_length:
            window = batch_size * 50
            epoch = [i for start in range(0, len(epoch), window)
                     for i in sorted(epoch[start:start + window], key=lengths.__getitem__)]
            batches = [epoch[i:i + batch_size] for i in range(0, len(epoch), batch_size)]
            rng.shuffle(batches)
            epoch = [i for b in batches for i in b]
        order.extend(epoch)
        while len(order) >= batch_size:
            yield order[:batch_size]
            del order[:batch_size]


# ---------------------------------------------------------------- model preparation


PAPER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_lora_targets(arch: Architecture, names: list[str]) -> list[str]:
    """Check the configured LoRA module names against block 0; `all-linear` takes every linear layer,
    `auto` the paper's projections when the model has them all (Llama, Mistral, Qwen, Gemma), else all-linear."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in arch.blocks[0].named_modules()
                     if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"})
    if names == ["auto"]:
        names = PAPER_LORA_TARGETS if set(PAPER_LORA_TARGETS) <= set(linear) else ["all-linear"]
    if names == ["all-linear"]:
        return linear
    missing = [n for n in names if n not in linear]
    if missing:
        raise ConfigError(f"lora_target_modules: {', '.join(missing)} not found in the model's blocks; "
                          f"its linear layers are {', '.join(linear)} (or use all-linear)")
    return names


def add_lora(model: nn.Module, arch: Architecture, config: RRConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
        target_modules=resolve_lora_targets(arch, config.lora_target_modules),
        layers_to_transform=list(range(config.kept_blocks)),
        layers_pattern=arch.blocks_path.rsplit(".", 1)[-1],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def switch_off_base_dropout(model: nn.Module) -> None:
    """RR compares the model with its own frozen pass: base-model dropout noise would count as drift.
    Only LoRA's own dropout stays active (as in the reference, whose models have no other dropout)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
            module.eval()
            module.p = 0.0  # attention code reads `.p` under its parent's training flag (GPT-2 + SDPA)
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# ---------------------------------------------------------------- the trainer


class FrozenStateCache:
    """Per-item hidden states of the adapter-disabled model. The base weights are frozen and base
    dropout is off, so these never change: computing them once saves a forward per step."""

    def __init__(self) -> None:
        self.items: dict[int, dict[int, torch.Tensor]] = {}

    def get(self, indices: list[int], width: int) -> dict[int, torch.Tensor] | None:
        if not all(i in self.items for i in indices):
            return None
        first = self.items[indices[0]]
        states = {}
        for entry, sample in first.items():
            padded = sample.new_zeros((len(indices), width, sample.shape[-1]))
            for row, i in enumerate(indices):
                value = self.items[i][entry]
                padded[row, :value.shape[0]] = value
            states[entry] = padded
        return states

    def put(self, indices: list[int], states: dict[int, torch.Tensor], lengths: list[int]) -> None:
        for row, (i, n) in enumerate(zip(indices, lengths)):
            if i not in self.items:
                self.items[i] = {entry: value[row, :n].clone() for entry, value in states.items()}


@dataclass
class TrainResult:
    output_dir: Path | None
    log: list[dict] = field(default_factory=list)
    model: nn.Module | None = None  # the merged full model
    tokenizer: object = None


class RRTrainer:
    """Representation Rerouting on a causal LM. `RRTrainer(config).train(out_dir)` does it all."""

    def __init__(self, config: RRConfig, *, model=None, tokenizer=None,
                 circuit_breaker_items: list[TokenizedExample] | None = None,
                 retain_items: list[TokenizedExample] | None = None, progress: bool = True):
        self.config = config
        self.progress = progress
        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        arch = find_architecture(model, config.blocks_path)
        if config.kept_blocks - 1 > arch.num_blocks:
            raise ConfigError(f"target_layers: {max(config.target_layers)} is past the last hidden-state entry "
                              f"({arch.num_blocks}) of this {arch.num_blocks}-block model")
        if config.chat_template:
            tokenizer.chat_template = config.chat_template
        if circuit_breaker_items is None or retain_items is None:
            circuit_breaker_items, retain_items = self._tokenized_sets()
        if not circuit_breaker_items or not retain_items:
            raise ConfigError("both the circuit-breaker and the retain set need at least one item")
        self.cb_items, self.retain_items = circuit_breaker_items, retain_items

        keep = min(config.kept_blocks, arch.num_blocks)
        self.dropped: DroppedBlocks | None = None
        if not config.full_layers and keep < arch.num_blocks:
            self.dropped = drop_blocks_after(model, keep, arch.blocks_path)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = add_lora(model, find_architecture(model, arch.blocks_path), config)
        self.arch = find_architecture(self.model, arch.blocks_path)
        self.retain_entries = list(range(self.arch.num_blocks + 1))  # all of output_hidden_states
        self.target_layers = list(config.target_layers)

        checkpointing = config.gradient_checkpointing == "true" or (
            config.gradient_checkpointing == "auto" and self.device.type == "cuda")
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.model.train()
        switch_off_base_dropout(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._plan_frozen_caches()
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)

    def _plan_frozen_caches(self) -> None:
        """Cache the frozen states of a whole set when it fits in `frozen_cache_gb` (first come, first served)."""
        base = unwrap(self.model)
        bytes_per_value = torch.finfo(next(base.parameters()).dtype).bits // 8
        budget = self.config.frozen_cache_gb * 2**30
        caches = []
        for items, entries in ((self.cb_items, self.target_layers), (self.retain_items, self.retain_entries)):
            size = sum(x.length for x in items) * len(entries) * base.config.hidden_size * bytes_per_value
            caches.append(FrozenStateCache() if size <= budget else None)
            budget -= size if size <= budget else 0
        self.cb_cache, self.retain_cache = caches

    def _tokenized_sets(self):
        config = self.config
        cb, retain = load_training_sets(config.circuit_breaker_data, config.retain_data, seed=config.seed,
                                        response_field=config.response_field, refusals=config.refusal_retain)
        # Augmentation applies to both sets, as in the reference; tokenised once here, never again.
        formatter = ChatFormatter(self.tokenizer, config.max_length, seed=config.seed,
                                  drop_instruction_prob=config.drop_instruction_prob, truncation=config.truncation)
        return tokenize_examples(cb, formatter), tokenize_examples(retain, formatter)

    # ------------------------------------------------------------ one step

    def _batch(self, items: list[TokenizedExample], indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([items[i] for i in indices], self.tokenizer.pad_token_id)
        return {**{k: v.to(self.device) for k, v in batch.items()}, "indices": list(indices)}

    def _frozen(self, batch, entries, cache: "FrozenStateCache | None"):
        """Hidden states of the adapter-disabled model, from the cache when every item is in it."""
        if cache is not None and (states := cache.get(batch["indices"], batch["input_ids"].shape[1])) is not None:
            return states
        with torch.no_grad(), self.model.disable_adapter():
            states = decoder_hidden_states(self.arch, batch["input_ids"], batch["attention_mask"], entries)
        if cache is not None:
            cache.put(batch["indices"], states, batch["attention_mask"].sum(dim=1).tolist())
        return states

    def _trained(self, batch, entries):
        return decoder_hidden_states(self.arch, batch["input_ids"], batch["attention_mask"], entries)

    def rerouting_terms(self, batch) -> tuple[torch.Tensor, float]:
        mask = batch["response_mask"] if self.config.reroute_tokens == "response" else batch["attention_mask"]
        orig = self._frozen(batch, self.target_layers, self.cb_cache)
        lora = self._trained(batch, self.target_layers)
        loss = losses.rerouting_loss(lora, orig, mask, self.target_layers)
        return loss, losses.mean_cosine(lora, orig, mask, self.target_layers)

    def retain_terms(self, batch) -> tuple[torch.Tensor, float]:
        mask = batch["attention_mask"]
        orig = self._frozen(batch, self.retain_entries, self.retain_cache)
        lora = self._trained(batch, self.retain_entries)
        loss = losses.retain_loss(lora, orig, mask, self.retain_entries,
                                  normalization=self.config.retain_normalization,
                                  reference_length=self.config.reference_length,
                                  relative=self.config.retain_distance == "relative_l2")
        return loss, losses.mean_cosine(lora, orig, mask, self.target_layers)

    def step(self, step: int, cb_indices: list[int], retain_indices: list[int]) -> dict:
        """One optimizer step (1-based `step`); returns its train-log record."""
        config = self.config
        started = time.perf_counter()
        c_s, c_r = losses.rr_coefficients(step, config.alpha, config.denominator)
        c_r *= config.retain_weight
        micro = config.grad_accum
        totals = {"rerouting_loss": 0.0, "retain_loss": 0.0, "cb_cos": 0.0, "retain_cos": 0.0}
        tokens = 0
        for k in range(micro):
            size = len(cb_indices) // micro
            if c_s > 0:  # past the end of the schedule the rerouting term has no weight: skip its passes
                batch = self._batch(self.cb_items, cb_indices[k * size:(k + 1) * size])
                loss, cos = self.rerouting_terms(batch)
                (c_s * loss / micro).backward()
                totals["rerouting_loss"] += loss.item() / micro
                totals["cb_cos"] += cos / micro
                tokens += int(batch["attention_mask"].sum())
            batch = self._batch(self.retain_items, retain_indices[k * size:(k + 1) * size])
            loss, cos = self.retain_terms(batch)
            (c_r * loss / micro).backward()
            totals["retain_loss"] += loss.item() / micro
            totals["retain_cos"] += cos / micro
            tokens += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if c_s <= 0:
            totals["rerouting_loss"] = totals["cb_cos"] = None
        return {"step": step, "c_s": c_s, "c_r": c_r, **totals, "grad_norm": float(grad_norm),
                "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tokens / elapsed,
                "step_time_s": elapsed}

    # ------------------------------------------------------------ the loop

    def train(self, output_dir: str | os.PathLike | None = None) -> TrainResult:
        config = self.config
        out = Path(output_dir) if output_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            config.save(out / "config.yaml")
            log_path = out / "train_log.jsonl"
            log_path.unlink(missing_ok=True)
        cb_batches = batch_indices([x.length for x in self.cb_items], config.batch_size, config.seed)
        retain_batches = batch_indices([x.length for x in self.retain_items], config.batch_size, config.seed + 1)
        log: list[dict] = []
        bar = _progress(config.steps, self.progress)
        for step in range(1, config.steps + 1):
            record = self.step(step, next(cb_batches), next(retain_batches))
            if not all(math.isfinite(v) for v in (record["retain_loss"], record["grad_norm"])):
                raise FloatingPointError(f"step {step}: loss or gradient is not finite ({record})")
            log.append(record)
            if out is not None and (step % config.log_every == 0 or step == config.steps):
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("rerouting_loss", "retain_loss", "cb_cos")
                             if record[k] is not None}, refresh=False)
            bar.update(1)
        bar.close()
        merged = self.save(out) if out is not None else None
        return TrainResult(out, log, merged, self.tokenizer)

    # ------------------------------------------------------------ saving

    def save(self, out: Path) -> nn.Module:
        """Write OUT/adapter (PEFT) and OUT/model (merged, upper blocks re-attached, original config)."""
        blocks_path = self.arch.blocks_path  # also right for a model found through config.blocks_path
        _atomic_dir(out / "adapter", self.model.save_pretrained)
        merged = self.model.merge_and_unload()
        if self.dropped is not None:
            reference = next(merged.parameters())
            for block in self.dropped.blocks:
                block.to(device=reference.device, dtype=reference.dtype)
            self.dropped.reattach(merged, blocks_path)
            self.dropped = None
        merged.eval()

        def write_model(tmp: Path) -> None:
            merged.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(self.config))
        _atomic_dir(out / "model", write_model)
        self.model = merged
        return merged


def _atomic_dir(target: Path, write) -> None:
    """Fill a temporary sibling directory, then swap it in: never a half-written checkpoint."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_card(config: RRConfig) -> str:
    settings = {k: getattr(config, k) for k in ("target_layers", "alpha", "steps", "batch_size", "lr", "lora_r",
                                                 "lora_alpha", "retain_normalization", "retain_distance",
                                                 "retain_weight", "reroute_tokens", "drop_instruction_prob")}
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.items())
    return f"""---
base_model: {base_model_name(config.model)}
library_name: transformers
tags:
- circuit-breakers
- representation-rerouting
- safety
---

# {base_model_name(config.model)} + circuit breakers (Representation Rerouting)

This checkpoint is `{base_model_name(config.model)}` fine-tuned with Representation Rerouting
(Zou et al., "Improving Alignment and Robustness with Circuit Breakers", NeurIPS 2024) by the
`circuit-breakers` toolkit. LoRA weights are merged; it loads with `AutoModelForCausalLM.from_pretrained`.

| setting | value |
|---|---|
{rows}

The full resolved configuration is in `config.yaml` beside this directory.
"""


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc="RR training", unit="step")


def train(config: RRConfig | None = None, output_dir: str | os.PathLike | None = None, **overrides) -> TrainResult:
    """Circuit-break a model in one call: `train(RRConfig(model="smollm2-135m"), "runs/rr")`."""
    if config is None:
        config = RRConfig(**overrides)
    elif overrides:
        config = RRConfig.from_dict({**config.to_dict(), **overrides})
    return RRTrainer(config).train(output_dir)
