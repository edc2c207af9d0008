"""The frozen-state cache: per-item hidden states of the adapter-disabled model.

The base weights are frozen and base dropout is off, so the original model's states never change:
computing them once saves a forward per step. A set is cached whole when it fits in
`frozen_cache_gb` (first come, first served). For checkpoints the cache is saved in append-only
segments shared by all checkpoints (OUT/checkpoints/frozen-cache/rankR/SET-stepN.safetensors): a
resumed run must use the very values the uninterrupted one cached (recomputing them in other
batches differs in the last bits, and Adam can amplify that).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..atomic import atomic_file

CACHE_DIR = "frozen-cache"  # under OUT/checkpoints


class FrozenStateCache:
    """{item index: {hidden-state entry: (length, hidden) tensor}}, filled as batches are seen."""

    def __init__(self) -> None:
        self.items: dict[int, dict[int, torch.Tensor]] = {}

    def has(self, indices: list[int]) -> bool:
        return all(i in self.items for i in indices)

    def get(self, indices: list[int], width: int) -> dict[int, torch.Tensor] | None:
        """The states of a batch right-padded to `width`, or None unless every item is cached."""
        if not self.has(indices):
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

    def get_packed(self, indices: list[int], spans: list[tuple[int, int, int]], shape: tuple[int, int]
                   ) -> dict[int, torch.Tensor] | None:
        """The states of a packed batch (rows x width = `shape`; `spans`: each item's row, start, length;
        zeros at the rows' padding), or None unless every item is cached."""
        if not self.has(indices):
            return None
        states = {}
        for entry, sample in self.items[indices[0]].items():
            packed = sample.new_zeros((*shape, sample.shape[-1]))
            for i, (row, start, length) in zip(indices, spans):
                packed[row, start:start + length] = self.items[i][entry]
            states[entry] = packed
        return states

    def put_packed(self, indices: list[int], states: dict[int, torch.Tensor], spans: list[tuple[int, int, int]]
                   ) -> None:
        for i, (row, start, length) in zip(indices, spans):
            if i not in self.items:
                self.items[i] = {entry: value[row, start:start + length].clone() for entry, value in states.items()}


def cache_bytes(items: Sequence, entries: Sequence[int], hidden_size: int, bytes_per_value: int) -> int:
    """Bytes a full cache of `items` (TokenizedExamples) at `entries` takes."""
    return sum(x.length for x in items) * len(entries) * hidden_size * bytes_per_value


def plan_caches(sizes: dict[str, int], budget_gb: float, allowed: bool) -> dict[str, FrozenStateCache | None]:
    """A cache for each set (in order) whose full size still fits in the budget; none where not `allowed`
    (sharded runs: every forward is a collective, and a cache hit on one process only would deadlock)."""
    budget = budget_gb * 2**30
    caches: dict[str, FrozenStateCache | None] = {}
    for name, size in sizes.items():
        fits = allowed and size <= budget
        caches[name] = FrozenStateCache() if fits else None
        budget -= size if fits else 0
    return caches


class CacheSegments:
    """The segment files one process's caches consist of, and which items they hold."""

    def __init__(self, root: Path, rank: int) -> None:
        self.folder = Path(root) / CACHE_DIR / f"rank{rank}"
        self.files: dict[str, list[str]] = {}
        self.saved: dict[str, set[int]] = {}

    def append(self, caches: dict[str, FrozenStateCache], step: int) -> dict[str, list[str]]:
        """Write the items added since the last call as new segments; returns every segment per set."""
        for name, cache in caches.items():
            saved = self.saved.setdefault(name, set())
            new = {i: states for i, states in cache.items.items() if i not in saved}
            if new:
                self.files.setdefault(name, []).append(self._write(name, step, new))
                saved.update(new)
        return {name: list(files) for name, files in self.files.items()}

    def restore(self, caches: dict[str, FrozenStateCache], segments: dict[str, list[str]], device) -> None:
        """Fill `caches` from the segments a checkpoint lists; a lost segment costs exactness, not the run."""
        try:
            loaded = {name: self._read(segments.get(name, []), device) for name in caches}
        except (OSError, ValueError) as err:
            warnings.warn(f"frozen-state cache not restored ({err}): it is recomputed, and the run may differ "
                          "from an uninterrupted one in the last bits")
            return
        self.files = {name: list(files) for name, files in segments.items()}
        for name, cache in caches.items():
            cache.items.update(loaded[name])
            self.saved[name] = set(cache.items)

    def _write(self, name: str, step: int, items: dict) -> str:
        from safetensors.torch import save_file

        target = self.folder / f"{name}-step{step}.safetensors"
        tensors = {f"{item}.{entry}": value.detach().to("cpu").contiguous()
                   for item, states in items.items() for entry, value in states.items()}
        with atomic_file(target, fsync=True) as tmp:
            save_file(tensors, tmp)
        return target.name

    def _read(self, names: list[str], device) -> dict[int, dict[int, torch.Tensor]]:
        from safetensors.torch import load_file

        items: dict[int, dict[int, torch.Tensor]] = {}
        for name in names:
            for key, value in load_file(self.folder / name).items():
                item, entry = (int(x) for x in key.split("."))
                items.setdefault(item, {})[entry] = value.to(device)
        return items
