"""Refusal-direction attacks: white-box edits of the residual stream during generation.

The direction (Arditi et al. 2024, "Refusal in language models is mediated by a single
direction"): at hidden-state entry l (output_hidden_states numbering: entry 0 = the embeddings =
the input of block 0, entry l = the output of block l-1 = the input of block l), the difference of
the mean last-token activations on harmful and on harmless prompts, each shown in the chat template
with the assistant header (the last token is the last post-instruction token):

    d_l = mean_harmful(h_l[-1]) - mean_harmless(h_l[-1])          r_l = d_l / ||d_l||

Defaults: 64 prompts each from the project's built-in train splits ("harmful" and "benign"), the
direction from the model under attack (the attack is white-box). Arditi et al. additionally choose
the best (layer, position) on validation prompts; here the layer is a config value (default: the
middle entry, num_blocks // 2) and the position is the last token.

Two modes, two registry names:

* `refusal_ablation` (Arditi et al.): the direction r (from `layer`) is projected out of the
  residual stream everywhere: h <- h - (h . r) r at the embeddings and at every block's output
  at every position, prompt and generated tokens (a forward pre-hook on block 0 and a forward hook
  on every block). 33.75% HarmBench ASR on the released Llama RR
  model in the literature (80% on the original).
* `refusal_addition` (activation addition; the paper's "RepE attack" adds a harmfulness reading
  vector to 10 upper-middle layers with coefficient 1.0 for Llama / 0.65 for Mistral): adds
  `coefficient * v_l` to the residual stream at each entry l in `layers` (default [layer]), where
  v_l = -d_l (harmless minus harmful: towards compliance), scaled as `scale` says: "mean_diff" (the
  raw difference of means: coefficient 1 moves a harmful prompt's mean to the harmless mean, Arditi's
  convention) or "unit" (a unit vector: coefficient = the shift in residual-stream units, RepE's
  convention for a unit reading vector). A negative coefficient adds refusal instead. The reading
  vector here is the difference of means, not RepE's PCA of paired differences.

Hooks are removed in `finally`, also when generation fails.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..generation import generate
from ..models import find_architecture
from ._common import conversation, model_device
from .base import AttackOutput, Behavior, budget_of, refuse_images


@dataclass
class RefusalAblationConfig:
    """Directional ablation of the difference-of-means refusal direction at every layer."""

    n_prompts: int = 64  # harmful and harmless prompts each, for the direction
    harmful_prompts: str = "builtin"  # "builtin" (train split of the shipped harmful set) or a data file
    harmless_prompts: str = "builtin"  # "builtin" (train split of the shipped benign set) or a data file
    layer: int | None = None  # hidden-state entry 0..num_blocks-1 of the direction (None: num_blocks // 2)
    direction_batch_size: int = 16
    max_new_tokens: int = 256
    batch_size: int = 16
    system_prompt: str | None = None


@dataclass
class RefusalAdditionConfig(RefusalAblationConfig):
    """Activation addition towards compliance (RepE attack: 10 upper-middle layers, 1.0 Llama / 0.65 Mistral)."""

    coefficient: float = 1.0
    layers: tuple[int, ...] | None = None  # entries to add at (None: [layer]); each uses its own direction
    scale: str = "mean_diff"  # "mean_diff" (raw difference of means) or "unit"


def upper_middle_layers(num_blocks: int, count: int = 10) -> tuple[int, ...]:
    """`count` consecutive entries ending three quarters of the way up (RepE-style "upper-middle")."""
    end = max(count, round(num_blocks * 0.75))
    return tuple(range(max(1, end - count + 1), min(end, num_blocks - 1) + 1))


def _prompt_texts(spec: str, which: str, n: int) -> list[str]:
    from ..data.builtin import builtin_prompts
    from ..data.loaders import load_examples

    if spec == "builtin":
        examples = builtin_prompts("harmful" if which == "harmful" else "benign", "train")
    else:
        examples = load_examples(spec, require_response=False)
    texts = [e.request for e in examples if e.request]
    if len(texts) < 1:
        raise ValueError(f"no {which} prompts in {spec!r}")
    return texts[:n]


@torch.no_grad()
def mean_last_token_states(model, tokenizer, prompts: Sequence[str], entries: Sequence[int], *,
                           batch_size: int = 16, system_prompt: str | None = None) -> dict[int, torch.Tensor]:
    """{entry: mean over prompts of the last token's hidden state} (float32), prompts in the chat template."""
    device = model_device(model)
    sums: dict[int, torch.Tensor] = {}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the last position is every row's last token
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(conversation(p, system_prompt), add_generation_prompt=True,
                                                   tokenize=False) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=positions, output_hidden_states=True, use_cache=False)
            for e in entries:
                last = out.hidden_states[e][:, -1, :].float().sum(dim=0)
                sums[e] = sums[e] + last if e in sums else last
    finally:
        tokenizer.padding_side = side
    return {e: s / len(prompts) for e, s in sums.items()}


def difference_of_means(model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], entries: Sequence[int],
                        *, batch_size: int = 16, system_prompt: str | None = None) -> dict[int, torch.Tensor]:
    """{entry: mean(harmful) - mean(harmless)} of the last-token hidden states (float32, unnormalised)."""
    h = mean_last_token_states(model, tokenizer, harmful, entries, batch_size=batch_size, system_prompt=system_prompt)
    b = mean_last_token_states(model, tokenizer, harmless, entries, batch_size=batch_size,
                               system_prompt=system_prompt)
    return {e: h[e] - b[e] for e in entries}


def _edit_hooks(arch, edits: dict) -> list:
    """Hooks applying edits[entry](hidden) to hidden-state entry `entry` (0..num_blocks): a forward
    pre-hook on block 0 for the embeddings, a forward hook on block entry-1's output otherwise."""
    n = arch.num_blocks
    handles = []
    for entry, edit in edits.items():
        if not 0 <= entry <= n:
            raise ValueError(f"hidden-state entry {entry} outside 0..{n}")
        if entry == 0:
            def pre_hook(module, args, kwargs, edit=edit):
                if args:
                    return (edit(args[0]),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = edit(kwargs["hidden_states"])
                return args, kwargs
            handles.append(arch.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(module, args, output, edit=edit):
                if isinstance(output, (tuple, list)):
                    return (edit(output[0]),) + tuple(output[1:])
                return edit(output)
            handles.append(arch.blocks[entry - 1].register_forward_hook(hook))
    return handles


@contextmanager
def ablate_direction(model, direction: torch.Tensor) -> Iterator[None]:
    """Project the unit direction out of every residual-stream entry (embeddings, every block output)."""
    arch = find_architecture(model)
    r = direction.float() / direction.float().norm()

    def edit(h: torch.Tensor) -> torch.Tensor:
        rr = r.to(device=h.device, dtype=h.dtype)
        return h - (h @ rr).unsqueeze(-1) * rr

    handles = _edit_hooks(arch, {e: edit for e in range(arch.num_blocks + 1)})
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_vectors(model, vectors: dict[int, torch.Tensor]) -> Iterator[None]:
    """Add vectors[entry] to hidden-state entry `entry` at every position."""
    arch = find_architecture(model)

    def make(v: torch.Tensor):
        def edit(h: torch.Tensor) -> torch.Tensor:
            return h + v.to(device=h.device, dtype=h.dtype)
        return edit

    handles = _edit_hooks(arch, {e: make(v) for e, v in vectors.items()})
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _RefusalDirectionAttack:
    name = ""
    takes_images = False
    config_class: type = RefusalAblationConfig

    def __init__(self, config=None):
        self.config = config or self.config_class()

    def entries(self, model) -> tuple[int, list[int]]:
        """(the direction's entry, every entry a direction is needed at)."""
        n = find_architecture(model).num_blocks
        layer = self.config.layer if self.config.layer is not None else n // 2
        if not 0 <= layer < n:  # entry n is the final norm's output in output_hidden_states
            raise ValueError(f"layer {layer} outside 0..{n - 1}")
        return layer, [layer]

    def directions(self, model, tokenizer) -> dict[int, torch.Tensor]:
        cfg = self.config
        _, entries = self.entries(model)
        harmful = _prompt_texts(cfg.harmful_prompts, "harmful", cfg.n_prompts)
        harmless = _prompt_texts(cfg.harmless_prompts, "harmless", cfg.n_prompts)
        return difference_of_means(model, tokenizer, harmful, harmless, entries,
                                   batch_size=cfg.direction_batch_size, system_prompt=cfg.system_prompt)

    def hooks(self, model, diffs: dict[int, torch.Tensor]):
        raise NotImplementedError

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        refuse_images(self.name, behaviors)
        cfg = self.config
        was_training = model.training
        model.eval()
        try:
            diffs = self.directions(model, tokenizer)
            conversations = [conversation(b.user_message(), cfg.system_prompt) for b in behaviors]
            with self.hooks(model, diffs):  # hooks on the torch model: never the vLLM backend
                generations = generate(model, tokenizer, conversations, max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, torch_only=True)
        finally:
            model.train(was_training)
        layer, entries = self.entries(model)
        extra = {"layer": layer, "entries": entries,
                 "direction_norms": {e: float(d.norm()) for e, d in diffs.items()}}
        return [AttackOutput(behavior_id=b.id, attack=self.name, prompt=b.user_message(), generations=[g],
                             budget=budget_of(cfg), extra=dict(extra))
                for b, g in zip(behaviors, generations)]


class RefusalAblation(_RefusalDirectionAttack):
    name = "refusal_ablation"
    config_class = RefusalAblationConfig

    def hooks(self, model, diffs):
        layer, _ = self.entries(model)
        return ablate_direction(model, diffs[layer])


class RefusalAddition(_RefusalDirectionAttack):
    name = "refusal_addition"
    config_class = RefusalAdditionConfig

    def __init__(self, config: RefusalAdditionConfig | None = None):
        super().__init__(config)
        if self.config.scale not in ("mean_diff", "unit"):
            raise ValueError(f"scale: expected 'mean_diff' or 'unit', got {self.config.scale!r}")

    def entries(self, model):
        layer, _ = super().entries(model)
        n = find_architecture(model).num_blocks
        layers = [int(e) for e in self.config.layers] if self.config.layers else [layer]
        bad = [e for e in layers if not 0 <= e < n]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{n - 1}")
        return layer, layers

    def steering_vectors(self, diffs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{entry: the vector added there}: coefficient * (harmless - harmful), scaled per `scale`."""
        cfg = self.config
        out = {}
        for e, d in diffs.items():
            v = -d if cfg.scale == "mean_diff" else -d / d.norm()
            out[e] = cfg.coefficient * v
        return out

    def hooks(self, model, diffs):
        return add_vectors(model, self.steering_vectors(diffs))
