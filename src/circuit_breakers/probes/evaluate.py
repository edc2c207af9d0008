"""How often a calibrated probe halts harmful responses (TPR) and benign ones (FPR).

    circuit-breakers probe eval --model smollm2-135m --probe runs/probe-linear [--samples eval_out/samples.jsonl]

A response counts as halted when any of its tokens scores above the probe's threshold, as in the
monitor. Defaults: TPR on the held-out harmful responses (generated harmful.test) and, with
`samples`, on the harmful outputs an evaluation's attacks produced (`samples.jsonl` lines with
`prompt`, `output`, `label`; those with label "harmful"); FPR on benign.test and borderline.test.
Note that the default train_probe calibrates its threshold on those same benign/borderline test
responses, so their FPR is at most the target by construction; pass other benign sets for an
independent figure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.schema import DataError, Example
from .features import example_features
from .probe import Probe, response_max


def read_attack_samples(path: str | os.PathLike, label: str = "harmful") -> list[Example]:
    """The `label` outputs of an evaluation's samples.jsonl as Examples (prompt -> output)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in ("prompt", "output", "label"):
            if name not in record:
                raise DataError(f'{where}: field "{name}": missing')
        if record["label"] != label:
            continue
        prompt, output = record["prompt"], record["output"]
        if not isinstance(output, str):
            raise DataError(f'{where}: field "output": expected a string, got {type(output).__name__}')
        if not output.strip():
            continue  # nothing to score
        if isinstance(prompt, str):
            examples.append(Example(response=output, request=prompt, source=f"{path}:{n}"))
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                               for m in prompt):
            messages = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
            examples.append(Example(response=output, messages=messages, source=f"{path}:{n}"))
        else:
            raise DataError(f'{where}: field "prompt": expected a string or a list of {{"role", "content"}} '
                            f"objects")
    return examples


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(positive > negative) + half the ties; None if a side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    p, n = positive.double()[:, None], negative.double()[None, :]
    return float((p > n).double().mean() + 0.5 * (p == n).double().mean())


def response_logits(model, tokenizer, probe: Probe, examples: Sequence[Example], **options) -> torch.Tensor:
    """The max token logit of every response at the probe's layer."""
    feats = example_features(model, tokenizer, examples, probe.layer, **options)
    return response_max(probe.logits(feats.features), feats.item_index, feats.n_items)


def evaluate_probe(model, tokenizer, probe: Probe, *, harmful: Mapping[str, Sequence[Example]] | None = None,
                   benign: Mapping[str, Sequence[Example]] | None = None,
                   samples: str | os.PathLike | None = None, max_tokens_per_item: int | None = None,
                   max_length: int = 1024, batch_size: int = 8, progress: bool = False,
                   print_table: bool = True) -> dict:
    """TPR on harmful sets (and attack samples), FPR on benign sets; returns a dict, prints a table."""
    if probe.layer is None or probe.threshold_logit is None:
        raise ValueError("evaluate_probe needs a probe with a layer and a calibrated threshold")
    if harmful is None or benign is None:
        from ..data.builtin import generated_set
    if harmful is None:
        harmful = {"harmful.test": generated_set("harmful", "test")}
    harmful = dict(harmful)
    if samples is not None:
        harmful[f"attacks ({Path(samples).name})"] = read_attack_samples(samples)
    if benign is None:
        benign = {f"{name}.test": generated_set(name, "test") for name in ("benign", "borderline")}
    options = dict(max_tokens_per_item=max_tokens_per_item, max_length=max_length, batch_size=batch_size,
                   progress=progress)
    rows, maxima = {}, {}
    for metric, sets in (("tpr", harmful), ("fpr", dict(benign))):
        for name, examples in sets.items():
            if not examples:
                rows[name] = {"metric": metric, "responses": 0, "halted": 0, "rate": None}
                continue
            logits = response_logits(model, tokenizer, probe, examples, desc=name, **options)
            maxima[name] = (metric, logits)
            halted = int((logits > probe.threshold_logit).sum())
            rows[name] = {"metric": metric, "responses": len(logits), "halted": halted,
                          "rate": halted / len(logits)}
    pos = [l for m, l in maxima.values() if m == "tpr"]
    neg = [l for m, l in maxima.values() if m == "fpr"]
    result = {
        "kind": probe.kind, "layer": probe.layer, "threshold": probe.threshold,
        "threshold_logit": probe.threshold_logit, "target_fpr": probe.target_fpr,
        "max_tokens_per_item": max_tokens_per_item, "sets": rows,
        "auroc": auroc(torch.cat(pos), torch.cat(neg)) if pos and neg else None,
    }
    if print_table:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['kind']} probe, layer {result['layer']}, threshold {result['threshold']:.6g} "
             f"(logit {result['threshold_logit']:.4g}, target FPR {result['target_fpr']})",
             f"{'set':<40} {'metric':>6} {'responses':>9} {'halted':>7} {'rate':>7}"]
    for name, row in result["sets"].items():
        rate = "-" if row["rate"] is None else f"{row['rate']:.3f}"
        lines.append(f"{name:<40} {row['metric'].upper():>6} {row['responses']:>9} {row['halted']:>7} {rate:>7}")
    if result.get("auroc") is not None:
        lines.append(f"per-response AUROC (all harmful vs all benign sets): {result['auroc']:.3f}")
    return "\n".join(lines)
