"""The LoRA adapter: which layers it wraps, how it starts, and how it is saved (alone and merged).

RR trains LoRA weights only, on the kept blocks (docs/method.md section 5); the frozen pass is the same
model with the adapter disabled, never a second copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_directory
from ..config import ConfigError, RRConfig
from ..models import Architecture, DroppedBlocks, base_model_name, is_multimodal

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


def add_lora(model: nn.Module, arch: Architecture, config: RRConfig, blocks: int | None = None):
    """The PEFT model with LoRA on blocks 0..blocks-1 (default: config.kept_blocks; every base weight frozen)."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    names = resolve_lora_targets(arch, config.lora_target_modules)
    indices = list(range(config.kept_blocks if blocks is None else blocks))
    if is_multimodal(model):
        # A vision tower has "layers" of linears with the same names (q_proj, ...): name the language model's
        # blocks by their full path instead (PEFT takes a regex over module names, without layers_to_transform).
        where = dict(target_modules=rf"{re.escape(arch.blocks_path)}\.({'|'.join(map(str, indices))})\."
                                    rf"(.*\.)?({'|'.join(map(re.escape, names))})")
    else:
        where = dict(target_modules=names, layers_to_transform=indices,
                     layers_pattern=arch.blocks_path.rsplit(".", 1)[-1])
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", **where)
    return get_peft_model(model, lora)


def seed_lora_b(model: nn.Module, seed: int, scale: float) -> None:
    """`seeded_start: lora`: B ~ scale * N(0, 1) from the seed instead of 0, so that the first steps'
    direction is a function of the seed, not of rounding noise (docs/method-notes.md)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def switch_off_base_dropout(model: nn.Module) -> None:
    """RR compares the model with its own frozen pass: base-model dropout noise would count as drift.
    Only LoRA's own dropout stays active (as in the reference, whose models have no other dropout)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
            module.eval()
            module.p = 0.0  # attention code reads `.p` under its parent's training flag (GPT-2 + SDPA)
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_parameter_names(model: nn.Module) -> dict[str, str]:
    """{name in an adapter file: parameter name} (PEFT drops the adapter name from saved keys)."""
    adapter = f".{model.active_adapter}."
    return {name.replace(adapter, "."): name for name, p in model.named_parameters() if p.requires_grad}


def check_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], source: Path) -> dict[str, str]:
    """The adapter-file keys of `model`'s LoRA weights; a ConfigError when `adapter` lacks any."""
    names = lora_parameter_names(model)
    missing = sorted(set(names) - set(adapter))
    if missing:
        raise ConfigError(f"{source}: the adapter lacks {len(missing)} LoRA weights (e.g. {missing[0]})")
    return names


def save_adapter_and_merged(peft_model, dropped: DroppedBlocks | None, blocks_path: str, tokenizer,
                            config: RRConfig, out: Path) -> nn.Module:
    """Write OUT/adapter (PEFT) and OUT/model (LoRA merged, upper blocks re-attached, the original
    config: it loads with the model's own auto class). Returns the merged model."""
    with atomic_directory(out / "adapter") as tmp:
        peft_model.save_pretrained(tmp)
    merged = peft_model.merge_and_unload()
    if dropped is not None:
        reference = next(merged.parameters())
        for block in dropped.blocks:
            block.to(device=reference.device, dtype=reference.dtype)
        dropped.reattach(merged, blocks_path)
    merged.eval()
    with atomic_directory(out / "model") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # a VLM's ProcessorTokenizer writes the whole processor
        auto_class = "AutoModelForImageTextToText" if is_multimodal(merged) else "AutoModelForCausalLM"
        (tmp / "README.md").write_text(model_card(config, auto_class))
    return merged


def model_card(config: RRConfig, auto_class: str = "AutoModelForCausalLM") -> str:
    settings = {k: getattr(config, k) for k in ("method", "target_layers", "alpha", "steps", "batch_size", "lr", "lora_r",
                                                 "lora_alpha", "retain_normalization", "retain_distance",
                                                 "retain_weight", "retain_response_weight", "reroute_tokens", "drop_instruction_prob")}
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
`circuit-breakers` toolkit. LoRA weights are merged; it loads with `{auto_class}.from_pretrained`.

| setting | value |
|---|---|
{rows}

The full resolved configuration is in `config.yaml` beside this directory.
"""
