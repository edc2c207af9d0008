"""Which items a probe was fitted on, which calibrated its threshold, and keeping both out of evaluation.

An item is one conversation and its response; `item_key` names it by content (a hash of the turns
before the response and the response), so the same item has the same key in any file. Splits are
by item, never by token: all of one response's tokens land on one side.

The default calibration set is a held-out part of the retain *train* sets (benign.train and
borderline.train) that the probe is not fitted on: `calibration_split` takes a fixed fraction of every
category, chosen by a fixed seed over the items' keys (so neither the file's order nor the probe's
seed changes it). The test sets (benign.test, borderline.test, harmful.test) are left whole for
`probe eval`, which refuses to report on items the probe was fitted or calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Iterable, Mapping, Sequence

from ..data.schema import Example

CALIBRATION_FRACTION = 0.2
CALIBRATION_SEED = 20240  # fixed: the calibration items do not depend on the probe's --seed
KEY_LENGTH = 16  # hex digits of sha256


class ProbeOverlapWarning(UserWarning):
    """Items shared between a probe's training, calibration or evaluation sets, or an unverifiable probe."""


def item_key(item) -> str:
    """A content key of an Example (or anything with `.example`, e.g. an attack sample): turns + response."""
    example = getattr(item, "example", item)
    payload = json.dumps({"conversation": example.conversation(), "response": example.response},
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def item_keys(items: Iterable) -> set[str]:
    return {item_key(item) for item in items}


def calibration_split(examples: Sequence[Example], fraction: float = CALIBRATION_FRACTION, *,
                      seed: int = CALIBRATION_SEED) -> tuple[list[Example], list[Example]]:
    """(fit, calibration): `fraction` of every category's distinct items held out for calibration.

    Per category (None counts as one), the distinct item keys are sorted, shuffled with `seed` and
    the first round(n * fraction) (at least 1 when the category has 2 or more items, 0 with 1) are
    the calibration items; duplicates of one item always land on the same side. Both parts keep
    the input order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration fraction must be in (0, 1), got {fraction}")
    keys = [item_key(e) for e in examples]
    by_category: dict[str, set[str]] = {}
    for example, key in zip(examples, keys):
        by_category.setdefault(example.category or "", set()).add(key)
    rng = random.Random(seed)
    held: set[str] = set()
    for category in sorted(by_category):
        group = sorted(by_category[category])
        rng.shuffle(group)
        n = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        held.update(group[:n])
    fit = [e for e, k in zip(examples, keys) if k not in held]
    calibration = [e for e, k in zip(examples, keys) if k in held]
    return fit, calibration


def overlap(sets: Mapping[str, Sequence], keys: set[str]) -> dict[str, int]:
    """{set name: how many of its items have a key in `keys`}, for the sets with any."""
    counts = {name: sum(item_key(item) in keys for item in items) for name, items in sets.items()}
    return {name: n for name, n in counts.items() if n}
