"""Train and calibrate a harmfulness probe, and save it.

    circuit-breakers probe train --model smollm2-135m --kind linear --fpr 0.05 --out runs/probe-linear

Default data (the built-in sets the model generated, `circuit_breakers.data.builtin.generated_set`):
positive = harmful.train (the circuit-breaker set); negative = benign.train, borderline.train and
refusal.train (the retain sets); the threshold is calibrated on the held-out benign.test and
borderline.test responses, so that at most `fpr` of them would be halted.

Layers (hidden-state entry numbering): the paper probes Mistral-7B at 16 (of 32 blocks) and
Llama-3-8B at its last layer. For the embedded default (SmolLM2-135M, 30 blocks) the default is
layer 20, chosen by `benchmarks/probe_layers.py` (docs/probes.md: best held-out AUROC and TPR of
5/10/15/20/25/30); for any other model the middle one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.schema import Example
from ..models import EMBEDDED_DEFAULT, find_architecture
from .features import example_features, labelled_features
from .probe import Probe, make_probe

# Measured defaults: {model name: layer}. See docs/probes.md for the measurement.
MEASURED_LAYERS = {EMBEDDED_DEFAULT: 20}

ExampleSets = Mapping[str, Sequence[Example]] | Sequence[Example]


def default_layer(model, model_name: str | None = None) -> int:
    """The measured layer for a known model, else the middle of the stack (paper: Mistral 16 of 32)."""
    if model_name in MEASURED_LAYERS:
        return MEASURED_LAYERS[model_name]
    return find_architecture(model).num_blocks // 2


def builtin_sets() -> tuple[dict, dict, dict]:
    """(positive, negative, held-out benign) named sets from the shipped generated data."""
    from ..data.builtin import generated_set

    positive = {"harmful.train": generated_set("harmful", "train")}
    negative = {f"{name}.train": generated_set(name, "train") for name in ("benign", "borderline", "refusal")}
    heldout = {f"{name}.test": generated_set(name, "test") for name in ("benign", "borderline")}
    return positive, negative, heldout


def named_sets(sets: ExampleSets | None, default_name: str) -> dict[str, list[Example]] | None:
    if sets is None:
        return None
    if isinstance(sets, Mapping):
        return {name: list(examples) for name, examples in sets.items()}
    return {default_name: list(sets)}


def train_probe(model, tokenizer, layer: int | None, kind: str, fpr: float, out_dir: str | Path | None, *,
                positive: ExampleSets | None = None, negative: ExampleSets | None = None,
                heldout_benign: ExampleSets | None = None, seed: int = 0, max_tokens_per_item: int | None = None,
                max_length: int = 1024, batch_size: int = 8, epochs: int = 10, lr: float = 1e-3,
                weight_decay: float = 1e-2, base_model: str | None = None, progress: bool = False) -> Probe:
    """Extract response-token features at `layer`, fit a `kind` probe, calibrate it to `fpr`, save it.

    Sets are lists of Examples or {name: list}; None means the built-in sets (module docstring).
    `max_tokens_per_item` keeps only the first N response tokens of every training item; the
    held-out benign responses are always scored whole, as the monitor will see them. Returns the probe; with `out_dir` it is also saved there.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    started = time.time()
    if positive is None or negative is None or heldout_benign is None:
        defaults = builtin_sets()
    positive = named_sets(positive, "positive") if positive is not None else defaults[0]
    negative = named_sets(negative, "negative") if negative is not None else defaults[1]
    heldout = named_sets(heldout_benign, "heldout_benign") if heldout_benign is not None else defaults[2]
    for what, sets in (("positive", positive), ("negative", negative), ("heldout_benign", heldout)):
        if not sets or not any(sets.values()):
            raise ValueError(f"{what}: no examples")
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
    calibration = {name: example_features(model, tokenizer, examples, layer, desc=name, **uncapped)
                   for name, examples in heldout.items()}
    X = torch.cat([f.features for f in calibration.values()])
    groups, offset = [], 0
    for feats in calibration.values():
        groups.append(feats.item_index + offset)
        offset += feats.n_items
    probe.calibrate(X, torch.cat(groups), fpr)

    summary = {name: dict(stats) for name, stats in data.summary.items()}
    for name, feats in calibration.items():
        summary[name] = {"label": "calibration", "items": feats.n_items, "tokens": feats.n_tokens}
    probe.info.update({
        "base_model": base_model,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training_data": {"sets": summary, "max_tokens_per_item": max_tokens_per_item, "max_length": max_length},
    })
    probe.info["training"]["seconds"] = round(time.time() - started, 1)
    if out_dir is not None:
        probe.save(out_dir)
    return probe
