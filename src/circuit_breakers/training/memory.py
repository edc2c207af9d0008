"""Activation memory: gradient checkpointing chosen by measured memory, per batch and per block.

Checkpointing a block trades one extra forward of it (about a third of its grad-pass time) for not
keeping its activations. Checkpointing every block, as the reference does, pays that price even when
the activations would fit. Here the bytes a block keeps per token are measured once on the actual
model, and before each grad pass the planner leaves as many blocks un-checkpointed as fit in the
activation budget for that batch's padded size; the others are checkpointed.
"""

from __future__ import annotations

import math

import torch

from ..hidden import decoder_hidden_states
from ..models import Architecture


def supports_per_block_checkpointing(arch: Architecture) -> bool:
    """transformers' GradientCheckpointingLayer reads a per-block `gradient_checkpointing` flag."""
    return all(hasattr(block, "gradient_checkpointing") for block in arch.blocks)


def measure_activation_bytes_per_token(arch: Architecture, entries: list[int], tokens: int = 512) -> tuple[int, int]:
    """(bytes one un-checkpointed block keeps per token, bytes a checkpointed one keeps), measured
    on the device with one grad forward of `tokens` positions (CUDA only: allocator statistics)."""
    device = next(arch.decoder.parameters()).device
    blocks = list(arch.blocks)
    flags = [block.gradient_checkpointing for block in blocks]
    ids = torch.randint(3, 100, (1, tokens), device=device)
    mask = torch.ones_like(ids)
    kept = {}
    try:
        for checkpointed in (False, True):
            for block in blocks:
                block.gradient_checkpointing = checkpointed
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            with torch.enable_grad():
                states = decoder_hidden_states(arch, ids, mask, entries)
                torch.cuda.synchronize(device)
                kept[checkpointed] = torch.cuda.memory_allocated(device) - before
            del states
    finally:
        for block, flag in zip(blocks, flags):
            block.gradient_checkpointing = flag
    per_token = lambda total: max(1, math.ceil(total / (tokens * len(blocks))))  # noqa: E731
    return per_token(kept[False]), per_token(kept[True])


class CheckpointPlanner:
    """Chooses, for each grad pass, how many blocks run without checkpointing.

    `budget_bytes` is what the grad pass's kept activations may use. `full` and `checkpointed` are
    the measured bytes per token per block in each mode; with P padded positions, k un-checkpointed
    blocks of n keep P * (k * full + (n - k) * checkpointed), plus one block's recompute at backward.
    """

    def __init__(self, arch: Architecture, budget_bytes: float, full: int, checkpointed: int):
        self.blocks = list(arch.blocks)
        self.budget = budget_bytes
        self.full, self.checkpointed = full, checkpointed
        self.last_uncheckpointed: int | None = None

    def blocks_without_checkpointing(self, positions: int) -> int:
        n = len(self.blocks)
        # One checkpointed block is recomputed at a time during backward: reserve its activations.
        spare = self.budget - positions * (n * self.checkpointed + self.full)
        extra = max(self.full - self.checkpointed, 1)
        return int(min(n, max(0, spare // (positions * extra))))

    def plan(self, positions: int) -> int:
        k = self.blocks_without_checkpointing(positions)
        for index, block in enumerate(self.blocks):
            block.gradient_checkpointing = index >= k
        self.last_uncheckpointed = k
        return k


def setup_activation_checkpointing(model, arch: Architecture, config, device: torch.device, entries: list[int], *,
                                   per_batch_plans: bool) -> CheckpointPlanner | None:
    """Switch gradient checkpointing on as configured (`true`, or `auto` on CUDA). Under `auto`, where
    the parallel mode allows plans that differ between processes, returns a planner that leaves as
    many blocks un-checkpointed as the measured activation budget allows; else every block is."""
    mode = config.gradient_checkpointing
    if not (mode == "true" or (mode == "auto" and device.type == "cuda")):
        return None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if mode != "auto" or not per_batch_plans or not supports_per_block_checkpointing(arch):
        return None
    full, checkpointed = measure_activation_bytes_per_token(arch, entries)
    if config.activation_memory_gb is not None:
        budget = config.activation_memory_gb * 2**30
    else:
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.8 * free - config.frozen_cache_gb * 2**30
    return CheckpointPlanner(arch, budget, full, checkpointed)
