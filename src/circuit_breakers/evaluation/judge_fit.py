"""Fit the `fitted` judge on part of the hand labels and measure every judge on the rest.

    circuit-breakers eval fit-judge [--labels FILE] [--model smollm2-135m] [--out PARAMS.json]

The split is by behaviour (the request text): every output of one request falls on the same side, so
the held-out figures are about requests the judge never saw. It is fixed by `SPLIT_SEED` and
recorded in the parameters file (`heldout_ids`); `eval judge-agreement` reads it and reports a
fitted judge on its held-out items only.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from ..judges.fitted import class_of, features, fit
from .agreement import LabelledOutput

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.5


def split_by_request(items: Sequence[LabelledOutput], *, seed: int = SPLIT_SEED,
                     heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[LabelledOutput], list[LabelledOutput]]:
    """(fit, held-out): requests shuffled by `seed`, taken into held-out until it holds the fraction of items.
    Per prompt kind, so that both parts see harmful, borderline and benign requests."""
    fit_part, heldout = [], []
    for kind in sorted({item.prompt_kind for item in items}):
        groups: dict[str, list[LabelledOutput]] = {}
        for item in items:
            if item.prompt_kind == kind:
                groups.setdefault(item.prompt, []).append(item)
        requests = sorted(groups)
        random.Random(f"{seed}-{kind}").shuffle(requests)
        wanted, taken = heldout_fraction * sum(len(g) for g in groups.values()), 0
        for request in requests:
            side = heldout if taken < wanted else fit_part
            side.extend(groups[request])
            taken += len(groups[request]) if side is heldout else 0
    return fit_part, heldout


def ids_digest(items: Sequence[LabelledOutput]) -> str:
    return hashlib.sha256("\n".join(sorted(item.id for item in items)).encode()).hexdigest()[:16]


def item_features(items: Sequence[LabelledOutput], perplexities: Sequence[float]) -> list[list[float]]:
    return [features(item.prompt, item.output, harmful_prompt=item.prompt_kind == "harmful", perplexity=p)
            for item, p in zip(items, perplexities)]


def perplexities_of(items: Sequence[LabelledOutput], reference) -> list[float]:
    """Each output's perplexity under the ORIGINAL model (`reference` = (model, tokenizer))."""
    from ..judges.heuristic import reference_perplexities

    return reference_perplexities(*reference, [item.behavior() for item in items], [item.output for item in items])


def fit_judge(items: Sequence[LabelledOutput], reference=None, *, perplexities: dict[str, float] | None = None,
              seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION,
              l2: float = 1e-2) -> tuple[dict, list[LabelledOutput]]:
    """(parameters, held-out items): fitted on the fit part only; the parameters record the split.
    Perplexities come from `reference` = (original model, tokenizer), or `perplexities` by item id."""
    fit_part, heldout = split_by_request(items, seed=seed, heldout_fraction=heldout_fraction)
    if perplexities is None:
        if reference is None:
            raise ValueError("fitting the judge needs the original model (--model) for the outputs' perplexity")
        perplexities = dict(zip((item.id for item in fit_part), perplexities_of(fit_part, reference)))
    rows = item_features(fit_part, [perplexities[item.id] for item in fit_part])
    params = fit(rows, [class_of(item.label, item.complies_in_form) for item in fit_part], l2=l2)
    params.update(split_seed=seed, heldout_fraction=heldout_fraction, fit_n=len(fit_part),
                  heldout_ids=sorted(item.id for item in heldout), labels_digest=ids_digest(items))
    return params, heldout


def fitted_on(params: dict, items: Sequence[LabelledOutput]) -> set[str]:
    """The ids of `items` a fitted judge may have been fitted on: when the labels hold its held-out part,
    every other item (its fit part, or labels added since: never counted as held out)."""
    heldout = set(params.get("heldout_ids", []))
    return {item.id for item in items if item.id not in heldout} if heldout & {item.id for item in items} else set()
