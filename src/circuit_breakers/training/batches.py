"""What the loop feeds the model: which items form each batch, and how items become model inputs.

The collator is the extension point for inputs other than token ids: whatever it returns besides
`response_mask` is passed to the decoder as keyword arguments, in both passes (a vision-language
collator adds `pixel_values`, a tool-use one renders tool schemas into the ids it returns).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from ..data import TokenizedExample, collate


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
            # A short last batch is shuffled in with the full ones, so the batches cut after it straddle two
            # length-sorted neighbours (22% of the agent recipe's circuit-breaker tokens are padding). Kept:
            # the shipped recipes were tuned on this order and did not hold with the short batch kept last
            # (benchmarks/RESULTS.md, "Padding from the short batch"); a fix must come with re-tuned recipes.
            rng.shuffle(batches)
            epoch = [i for b in batches for i in b]
        order.extend(epoch)
        while len(order) >= batch_size:
            yield order[:batch_size]
            del order[:batch_size]


class Collator(Protocol):
    """Items -> {"response_mask": (B, T) bool, and the model's keyword inputs, "attention_mask" among them}.

    A packing collator (packing.py) returns no attention_mask; instead `token_mask` (B, T: the real
    tokens) and `item_spans` (items x 3: row, start, length), which are not model inputs either."""

    # Whether two batches' inputs may be stacked into one right-padded pass (text: yes).
    stackable: bool

    def __call__(self, items: list[TokenizedExample]) -> dict[str, torch.Tensor]: ...


class TextCollator:
    """Token ids right-padded to the batch's longest item: input_ids, attention_mask (and response_mask)."""

    stackable = True

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_token_id)


@dataclass
class Batch:
    """One batch of one set: the model's inputs, which tokens are response tokens, and the items' indices."""

    inputs: dict[str, torch.Tensor]
    response_mask: torch.Tensor
    indices: list[int]
    token_mask: torch.Tensor | None = None  # packed rows: the real tokens (the decoder gets no attention_mask)
    spans: list[tuple[int, int, int]] | None = None  # packed rows: (row, start, length) of each item

    @property
    def packed(self) -> bool:
        return self.spans is not None

    @property
    def attention_mask(self) -> torch.Tensor:
        """The real tokens (B, T): the padding mask, or a packed batch's token mask."""
        return self.token_mask if self.token_mask is not None else self.inputs["attention_mask"]

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def lengths(self) -> list[int]:
        """Per row: the item's length (packed rows: the real tokens of the row)."""
        return self.attention_mask.sum(dim=1).tolist()

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batch(collator: Collator, items: list[TokenizedExample], indices: list[int], device) -> Batch:
    tensors = collator([items[i] for i in indices])
    response_mask = tensors.pop("response_mask").to(device)
    token_mask, spans = tensors.pop("token_mask", None), tensors.pop("item_spans", None)
    return Batch({k: v.to(device) for k, v in tensors.items()}, response_mask, list(indices),
                 None if token_mask is None else token_mask.to(device),
                 None if spans is None else [tuple(span) for span in spans.tolist()])


def stack_batches(a: Batch, b: Batch) -> dict[str, torch.Tensor]:
    """The inputs of two right-padded text batches as one (rows stacked, padded to the wider one): the
    states of a right-padded row do not depend on the padding after it."""
    width = max(a.width, b.width)
    return {key: torch.cat([torch.nn.functional.pad(x.inputs[key], (0, width - x.width)) for x in (a, b)])
            for key in a.inputs}
