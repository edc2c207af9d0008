"""Train and calibrate a harmfulness probe, and save it.

    circuit-breakers probe train --model smollm2-135m --kind linear --fpr 0.05 --out runs/probe-linear

Default data (the built-in sets the model generated, `circuit_breakers.data.builtin.generated_set`):
positive = harmful.train (the circuit-breaker set); negative = refusal.train and the fit part of
benign.train and borderline.train (the retain sets); the threshold is calibrated on the calibration
part of benign.train and borderline.train (`splits.calibration_split`: 20% of every category, fixed
seed, by item), which the probe is not fitted on, so that at most `fpr` of those responses would be
halted. Training, calibration and the test sets that `probe eval` reports on (harmful.test,
benign.test, borderline.test) are disjoint items; probe.json records which items fitted and which
calibrated the probe (`item_ids`), and `probe eval` refuses sets that overlap them.

With your own `negative` sets and no `heldout_benign`, the calibration part is carved out of each
negative set the same way; with `heldout_benign`, the threshold is calibrated on those (any of their
items that the probe was also fitted on are dropped from calibration, with a warning).

Layers (hidden-state entry numbering): the paper probes Mistral-7B at 16 (of 32 blocks) and
Llama-3-8B at its last layer. For the embedded default (SmolLM2-135M, 30 blocks) the default is
layer 20, chosen by `benchmarks/probe_layers.py` (docs/probes.md: best held-out AUROC and TPR of
5/10/15/20/25/30); for any other model the middle one.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.schema import Example
from ..models import EMBEDDED_DEFAULT, find_architecture
from .features import example_features, labelled_features
from .probe import Probe, make_probe
from .splits import CALIBRATION_FRACTION, CALIBRATION_SEED, ProbeOverlapWarning, calibration_split, item_key

# Measured defaults: {model name: layer}. See docs/probes.md for the measurement.
MEASURED_LAYERS = {EMBEDDED_DEFAULT: 20}
CALIBRATED_FROM = ("benign", "borderline")  # built-in retain sets the default calibration part comes from

ExampleSets = Mapping[str, Sequence[Example]] | Sequence[Example]


def default_layer(model, model_name: str | None = None) -> int:
    """The measured layer for a known model, else the middle of the stack (paper: Mistral 16 of 32)."""
    if model_name in MEASURED_LAYERS:
        return MEASURED_LAYERS[model_name]
    return find_architecture(model).num_blocks // 2


def carve_calibration(sets: Mapping[str, Sequence[Example]], fraction: float = CALIBRATION_FRACTION, *,
                      names: Sequence[str] | None = None, seed: int = CALIBRATION_SEED
                      ) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """(fit sets, calibration sets): `calibration_split` of every set in `names` (default: all).

    A split set `s` becomes `s[fit]` and `s[calibration]`; the other sets stay whole.
    """
    fit, calibration = {}, {}
    for name, examples in sets.items():
        if names is not None and name not in names:
            fit[name] = list(examples)
            continue
        kept, held = calibration_split(list(examples), fraction, seed=seed)
        fit[f"{name}[fit]"] = kept
        calibration[f"{name}[calibration]"] = held
    return fit, calibration


def builtin_sets(calibration_fraction: float | None = CALIBRATION_FRACTION) -> tuple[dict, dict, dict]:
    """(positive, negative, calibration) named sets from the shipped generated data's train split.

    With `calibration_fraction` None the retain sets stay whole and the calibration dict is empty.
    """
    from ..data.builtin import generated_set

    positive = {"harmful.train": generated_set("harmful", "train")}
    negative = {f"{name}.train": generated_set(name, "train") for name in ("benign", "borderline", "refusal")}
    if calibration_fraction is None:
        return positive, negative, {}
    negative, calibration = carve_calibration(negative, calibration_fraction,
                                              names=[f"{name}.train" for name in CALIBRATED_FROM])
    return positive, negative, calibration


def named_sets(sets: ExampleSets | None, default_name: str) -> dict[str, list[Example]] | None:
    if sets is None:
        return None
    if isinstance(sets, Mapping):
        return {name: list(examples) for name, examples in sets.items()}
    return {default_name: list(sets)}


def train_probe(model, tokenizer, layer: int | None, kind: str, fpr: float, out_dir: str | Path | None, *,
                positive: ExampleSets | None = None, negative: ExampleSets | None = None,
                heldout_benign: ExampleSets | None = None, calibration_fraction: float = CALIBRATION_FRACTION,
                seed: int = 0, max_tokens_per_item: int | None = None,
                max_length: int = 1024, batch_size: int = 8, epochs: int = 10, lr: float = 1e-3,
                weight_decay: float = 1e-2, base_model: str | None = None, progress: bool = False) -> Probe:
    """Extract response-token features at `layer`, fit a `kind` probe, calibrate it to `fpr`, save it.

    Sets are lists of Examples or {name: list}; None means the built-in sets (module docstring).
    Without `heldout_benign` the calibration responses are `calibration_fraction` of the negative
    sets (built-in: of benign.train and borderline.train), held out from fitting.
    `max_tokens_per_item` keeps only the first N response tokens of every training item; the
    calibration responses are always scored whole, as the monitor will see them. Returns the probe;
    with `out_dir` it is also saved there.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    started = time.time()
    given_heldout = heldout_benign is not None
    if positive is None or negative is None:
        defaults = builtin_sets(None if given_heldout or negative is not None else calibration_fraction)
    positive = named_sets(positive, "positive") if positive is not None else defaults[0]
    if negative is not None:
        negative = named_sets(negative, "negative")
        calibration: dict[str, list[Example]] = {}
        if not given_heldout:
            negative, calibration = carve_calibration(negative, calibration_fraction)
    else:
        negative, calibration = defaults[1], defaults[2]
    if given_heldout:
        calibration = named_sets(heldout_benign, "heldout_benign")
        split = {"source": "heldout", "description": "given calibration sets (--heldout)"}
    else:
        split = {"source": "train-holdout", "fraction": calibration_fraction, "seed": CALIBRATION_SEED,
                 "description": f"a held-out {calibration_fraction:g} of every category of "
                                f"{', '.join(n[:-len('[calibration]')] for n in calibration)}, "
                                f"by item, not fitted on"}
    for what, sets in (("positive", positive), ("negative", negative), ("calibration", calibration)):
        if not sets or not any(sets.values()):
            raise ValueError(f"{what}: no examples")

    # Item-level disjointness: no calibration response may be one the probe was fitted on.
    trained_keys = {item_key(e) for sets in (positive, negative) for examples in sets.values() for e in examples}
    dropped = {}
    for name, examples in list(calibration.items()):
        kept = [e for e in examples if item_key(e) not in trained_keys]
        if len(kept) < len(examples):
            dropped[name] = len(examples) - len(kept)
            calibration[name] = kept
    if dropped:
        warnings.warn(f"calibration: dropped items the probe is also fitted on: {dropped}", ProbeOverlapWarning,
                      stacklevel=2)
    calibration = {name: examples for name, examples in calibration.items() if examples}
    if not calibration:
        raise ValueError("calibration: no examples left that the probe is not fitted on")
    calibration_keys = {item_key(e) for examples in calibration.values() for e in examples}

    if layer is None:
        layer = default_layer(model, base_model)
    options = dict(max_length=max_length, max_tokens_per_item=max_tokens_per_item, batch_size=batch_size,
                   progress=progress)
    data = labelled_features(model, tokenizer, layer, positive, negative, **options)
    probe = make_probe(kind, data.X.shape[1], seed=seed, layer=layer)
    probe.fit(data.X, data.y, epochs=epochs, lr=lr, weight_decay=weight_decay, progress=progress)

    # Calibrate on whole responses: the monitor scores every generated token, so a cap here would
    # set the threshold on fewer tokens than it will see and raise the real false-positive rate.
    uncapped = dict(options, max_tokens_per_item=None)
    features = {name: example_features(model, tokenizer, examples, layer, desc=name, **uncapped)
                for name, examples in calibration.items()}
    X = torch.cat([f.features for f in features.values()])
    groups, offset = [], 0
    for feats in features.values():
        groups.append(feats.item_index + offset)
        offset += feats.n_items
    probe.calibrate(X, torch.cat(groups), fpr)
    probe.info["calibration"].update(split)
    probe.info["calibration"]["sets"] = {name: {"items": f.n_items, "tokens": f.n_tokens}
                                         for name, f in features.items()}
    probe.info["calibration"]["dropped_fitted_items"] = sum(dropped.values())

    summary = {name: dict(stats) for name, stats in data.summary.items()}
    for name, feats in features.items():
        summary[name] = {"label": "calibration", "items": feats.n_items, "tokens": feats.n_tokens}
    probe.info.update({
        "base_model": base_model,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training_data": {"sets": summary, "max_tokens_per_item": max_tokens_per_item, "max_length": max_length},
        "item_ids": {"training": sorted(trained_keys), "calibration": sorted(calibration_keys)},
    })
    probe.info["training"]["seconds"] = round(time.time() - started, 1)
    if out_dir is not None:
        probe.save(out_dir)
    return probe
