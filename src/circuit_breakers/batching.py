"""Inference batches of items of similar length: less padding computed (tool-use prompts span ~300-700 tokens).

    for chunk in length_sorted_batches([len(r) for r in rows], batch_size):  # lists of item indices
"""

from __future__ import annotations

from typing import Sequence


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices, shortest first (a stable sort: equal lengths keep their order), in batches of `batch_size`."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
