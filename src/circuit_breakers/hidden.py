"""Reading hidden states with forward hooks, in `output_hidden_states` numbering.

Entry 0 is the input of block 0 (the embeddings), entry i+1 the output of block i, except the last
entry (i+1 == number of blocks), which is the final norm's output, as transformers returns it.
Hooks keep only the entries the losses need instead of materialising every layer, and with
`stop_early` the forward stops once the highest requested entry is captured.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from .models import Architecture


class _StopForward(Exception):
    """Raised from a hook to skip the blocks above the last entry needed."""


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def capture_hidden_states(arch: Architecture, entries: Iterable[int], *, stop_early: bool = False
                          ) -> Iterator[dict[int, torch.Tensor]]:
    """Fill a dict {entry: hidden state} while the body runs a forward; hooks removed in `finally`."""
    entries = sorted(set(entries))
    n = arch.num_blocks
    if entries and (entries[0] < 0 or entries[-1] > n):
        raise ValueError(f"hidden-state entries must be in 0..{n} for a model with {n} blocks, got {entries}")
    states: dict[int, torch.Tensor] = {}
    last = entries[-1] if entries else -1
    handles = []

    def keep(entry: int, tensor: torch.Tensor) -> None:
        states[entry] = tensor
        if stop_early and entry == last:
            raise _StopForward

    try:
        if 0 in entries:
            def pre_hook(module, args, kwargs):
                keep(0, args[0] if args else kwargs["hidden_states"])
            handles.append(arch.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for entry in entries:
            if entry == 0:
                continue
            if entry == n and arch.final_norm is not None:
                module = arch.final_norm
            else:
                module = arch.blocks[entry - 1]

            def hook(module, args, output, entry=entry):
                keep(entry, _first_tensor(output))
            handles.append(module.register_forward_hook(hook))
        yield states
    finally:
        for handle in handles:
            handle.remove()


def decoder_hidden_states(arch: Architecture, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          entries: Iterable[int], *, stop_early: bool = True, **inputs) -> dict[int, torch.Tensor]:
    """Run the decoder (no LM head) and return the requested hidden-state entries. `inputs`: further
    keyword inputs of the decoder's forward (e.g. position_ids), passed on as they are. `attention_mask`
    None with per-item position_ids: packed rows (training/packing.py)."""
    with capture_hidden_states(arch, entries, stop_early=stop_early) as states:
        try:
            arch.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
        except _StopForward:
            pass
    return states
