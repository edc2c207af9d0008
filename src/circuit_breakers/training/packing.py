"""Packed sequences (`packing: true`): a batch's items laid end to end in rows of `pack_length` tokens.

Padded batches compute every row to the batch's longest item; packed rows hold several items each and
only the row's tail is padding. Attention never crosses items: each item's position ids restart at 0
and the decoder gets no 2D attention mask, which is the form in which transformers recognises packed
sequences (masking_utils.find_packed_sequence_indices: a new item wherever a position id is not its
predecessor's + 1) and builds the per-item causal mask for eager, sdpa and flex_attention (a block
mask that skips the other items' blocks) alike. `check_packing_support` verifies this once on the
actual model instead of trusting a list of implementations.

The losses are masked means over real tokens (losses.py), so they read the same tokens whether the
items are packed or padded; the only per-row quantity, the retain loss's "reference" normalisation
(rows x 1024), is given the number of items instead (`sequences`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import ConfigError
from ..data import TokenizedExample


def pack_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Item positions per row: first-fit decreasing into rows of at most `pack_length` tokens (each item
    whole: an item longer than a row is an error, never split)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > pack_length:
            raise ConfigError(f"pack_length ({pack_length}) is shorter than an item ({lengths[i]} tokens); "
                              "it must be at least max_length")
        for row, free in enumerate(room):
            if lengths[i] <= free:
                rows[row].append(i)
                room[row] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(pack_length - lengths[i])
    return rows


class PackingCollator:
    """Items -> packed rows: input_ids and position_ids (restarting at 0 per item; the row's padded
    tail counts as one more item), no attention_mask (transformers then masks per item), plus what
    the loop reads and does not pass to the decoder: `token_mask` (the real tokens), `response_mask`
    and `item_spans` ((items, 3): row, start, length of each item, in the order given)."""

    stackable = False  # packed rows are not two right-padded batches

    def __init__(self, pad_token_id: int, pack_length: int) -> None:
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length

    def __call__(self, items: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        rows = pack_rows([x.length for x in items], self.pack_length)
        width = max(sum(items[i].length for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        token_mask = torch.zeros((len(rows), width), dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        spans = torch.zeros((len(items), 3), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                item = items[i]
                end = start + item.length
                input_ids[r, start:end] = torch.tensor(item.input_ids, dtype=torch.long)
                position_ids[r, start:end] = torch.arange(item.length)
                token_mask[r, start:end] = 1
                response_mask[r, start + item.response_start:end] = True
                spans[i] = torch.tensor([r, start, item.length])
                start = end
            position_ids[r, start:] = torch.arange(width - start)  # the padding: an item of its own
        return {"input_ids": input_ids, "position_ids": position_ids, "token_mask": token_mask,
                "response_mask": response_mask, "item_spans": spans}


def unpack(states: torch.Tensor, spans: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Each item's (length, ...) slice of packed (rows, width, ...) states."""
    return [states[row, start:start + length] for row, start, length in spans]


@torch.no_grad()
def check_packing_support(model, arch, *, tokens: int = 24) -> None:
    """Raise ConfigError unless the decoder keeps packed items apart: the last entry's states of a short
    item must be the same alone as after a longer one in the same row (within the dtype's rounding)."""
    from ..hidden import decoder_hidden_states

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(3, vocab, (1, tokens), generator=generator)
    second = torch.randint(3, vocab, (1, 4), generator=generator)
    entry = arch.num_blocks
    was_training = model.training
    model.eval()
    try:
        alone = decoder_hidden_states(arch, second.to(device), torch.ones_like(second).to(device), [entry])[entry]
        ids = torch.cat([first, second], dim=1).to(device)
        positions = torch.cat([torch.arange(tokens), torch.arange(4)])[None].to(device)
        packed = decoder_hidden_states(arch, ids, None, [entry], position_ids=positions)[entry][:, tokens:]
    finally:
        model.train(was_training)
    error = float((packed.float() - alone.float()).abs().mean() / alone.float().abs().mean().clamp_min(1e-12))
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not error <= tolerance:
        implementation = getattr(unwrap_config(model), "_attn_implementation", None)
        raise ConfigError(
            f"packing: this model's attention ({implementation!r}, {type(model).__name__}) does not keep packed "
            f"items apart (relative error {error:.3g} > {tolerance:g} between an item alone and packed after "
            "another): it must build its causal mask from position_ids when no attention_mask is given, as "
            "transformers' eager, sdpa and flex_attention do for Llama, Qwen2 and Mistral; use one of those "
            "(attn_implementation) or packing: false")


def unwrap_config(model):
    from ..models import unwrap
    return getattr(unwrap(model), "config", None)
