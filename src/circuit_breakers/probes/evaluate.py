"""How often a calibrated probe halts harmful responses (TPR) and benign ones (FPR).

    circuit-breakers probe eval --model smollm2-135m --probe runs/probe-linear [--samples eval_out/samples.jsonl]

A response counts as halted when any of its tokens scores above the probe's threshold, as in the
monitor. Defaults: TPR on the held-out harmful responses (generated harmful.test) and, with
`samples`, on the harmful outputs an evaluation's attacks produced (`samples.jsonl` lines with
`prompt`, `output`, `label`; those with label "harmful"; one row per attack and one for all); FPR on
benign.test and borderline.test. The default train_probe calibrates its threshold on a held-out part
of benign.train and borderline.train (train.py), so these FPRs are on responses the probe never saw.

Independence is checked, not assumed: probe.json records the content keys of the items the probe was
fitted on and calibrated on (`item_ids`), and `evaluate_probe` refuses (`ProbeError`) any set holding
one of them, since its rate would be in-sample (an FPR on calibration items is at most the target by
construction). `allow_overlap=True` (CLI `--allow-overlap`) reports anyway, with a loud warning and
the row marked. A probe without `item_ids` (older files) cannot be checked: a warning says so.
The calibration the threshold came from (sets, responses, halted, achieved FPR) is in the result.

An attack sample is scored in the context the model saw: `extra.prompt_text` (the rendered prompt,
adversarial suffix or prefilled assistant text included) when the line has it, with a prefill
(`extra.prefill`) moved from the output to the prompt, since the monitor scores generated tokens
only; otherwise `prompt` as a user turn through the chat template.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.formatting import ChatFormatter, TokenizedExample
from ..data.schema import DataError, Example
from .features import response_token_features
from .probe import Probe, ProbeError, response_max
from .splits import ProbeOverlapWarning, item_key


@dataclass(frozen=True)
class AttackSample:
    """One attack output: the response to score and its context (rendered text, else an Example)."""

    response: str
    example: Example  # request/messages -> response, used when prompt_text is None
    prompt_text: str | None = None
    source: str | None = None


def _parse_prompt(prompt, where: str) -> dict:
    if isinstance(prompt, str):
        return {"request": prompt}
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return {"messages": tuple({"role": m["role"], "content": m["content"]} for m in prompt)}
    raise DataError(f'{where}: field "prompt": expected a string or a list of {{"role", "content"}} objects')


def read_attack_samples(path: str | os.PathLike, label: str = "harmful", *, model: str | None = None
                        ) -> dict[str, list[AttackSample]]:
    """The `label` outputs of an evaluation's samples.jsonl, by attack (lines without `attack`: "unnamed").

    `model` keeps only lines whose `model` field equals it (an evaluation writes the trained model's
    and the baseline's samples into one file). A half-written last line is skipped, as the
    evaluation's resume does.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    by_attack: dict[str, list[AttackSample]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == last:
                continue  # an interrupted writer
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in ("prompt", "output", "label"):
            if name not in record:
                raise DataError(f'{where}: field "{name}": missing')
        if record["label"] != label or (model is not None and record.get("model") != model):
            continue
        output = record["output"]
        if not isinstance(output, str):
            raise DataError(f'{where}: field "output": expected a string, got {type(output).__name__}')
        extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
        prompt_text = extra.get("prompt_text") if isinstance(extra.get("prompt_text"), str) else None
        response = output
        prefill = extra.get("prefill")
        if prompt_text is not None and isinstance(prefill, str) and prefill and output.startswith(prefill) \
                and prompt_text.endswith(prefill):
            response = output[len(prefill):]  # the prefill was prompt, not generated
        if not response.strip():
            continue  # nothing generated to score
        example = Example(response=response, source=f"{path}:{n}", **_parse_prompt(record["prompt"], where))
        attack = str(record.get("attack") or "unnamed")
        by_attack.setdefault(attack, []).append(AttackSample(response, example, prompt_text, f"{path}:{n}"))
    return by_attack


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(positive > negative) + half the ties; None if a side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    p, n = positive.double()[:, None], negative.double()[None, :]
    return float((p > n).double().mean() + 0.5 * (p == n).double().mean())


def _items(tokenizer, examples: Sequence[Example | AttackSample], max_length: int) -> list[TokenizedExample]:
    formatter = ChatFormatter(tokenizer, max_length)
    end_ids = list(tokenizer(formatter.end_of_turn, add_special_tokens=False)["input_ids"])
    items = []
    for item in examples:
        if isinstance(item, AttackSample) and item.prompt_text is not None:
            prompt = list(tokenizer(item.prompt_text, add_special_tokens=False)["input_ids"])
            response = list(tokenizer(item.response, add_special_tokens=False)["input_ids"]) + end_ids
            if len(prompt) + 1 > max_length:
                raise DataError(f"{item.source}: the prompt is {len(prompt)} tokens, no room for a response "
                                f"within max_length={max_length}")
            items.append(TokenizedExample(tuple((prompt + response)[:max_length]), len(prompt), item.source))
        else:
            items.append(formatter.format(item.example if isinstance(item, AttackSample) else item))
    return items


def response_logits(model, tokenizer, probe: Probe, examples: Sequence[Example | AttackSample], *,
                    max_length: int = 1024, **options) -> torch.Tensor:
    """The max token logit of every response at the probe's layer."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    feats = response_token_features(model, _items(tokenizer, examples, max_length), probe.layer,
                                    pad_token_id=pad, **options)
    return response_max(probe.logits(feats.features), feats.item_index, feats.n_items)


def evaluate_probe(model, tokenizer, probe: Probe, *, harmful: Mapping[str, Sequence[Example]] | None = None,
                   benign: Mapping[str, Sequence[Example]] | None = None,
                   samples: str | os.PathLike | None = None, samples_model: str | None = None,
                   max_tokens_per_item: int | None = None, max_length: int = 1024, batch_size: int = 8,
                   progress: bool = False, print_table: bool = True, allow_overlap: bool = False) -> dict:
    """TPR on harmful sets and attack samples, FPR on benign sets; returns a dict, prints a table.

    `result["sets"][name]` = {"metric": "tpr"|"fpr", "responses", "halted", "rate"}; attack samples
    give one row per attack ("attack <name>") and "attacks (all)". `result["auroc"]`: per-response
    AUROC of every harmful row (attacks included) against every benign row. `result["calibration"]`:
    what the threshold was calibrated on (from probe.json). Raises ProbeError when a set holds items
    the probe was fitted or calibrated on, unless `allow_overlap` (then the row has an "overlap"
    entry and a ProbeOverlapWarning is issued); `result["independence"]` is "checked" or, for a
    probe without recorded item keys, "unchecked".
    """
    if probe.layer is None or probe.threshold_logit is None:
        raise ValueError("evaluate_probe needs a probe with a layer and a calibrated threshold")
    if harmful is None or benign is None:
        from ..data.builtin import generated_set
    if harmful is None:
        harmful = {"harmful.test": generated_set("harmful", "test")}
    if benign is None:
        benign = {f"{name}.test": generated_set(name, "test") for name in ("benign", "borderline")}
    attacks = read_attack_samples(samples, model=samples_model) if samples is not None else {}
    options = dict(max_tokens_per_item=max_tokens_per_item, max_length=max_length, batch_size=batch_size,
                   progress=progress)
    rows, maxima = {}, {}

    def row(name: str, metric: str, logits: torch.Tensor | None) -> None:
        if logits is None or len(logits) == 0:
            rows[name] = {"metric": metric, "responses": 0, "halted": 0, "rate": None}
            return
        halted = int((logits > probe.threshold_logit).sum())
        rows[name] = {"metric": metric, "responses": len(logits), "halted": halted, "rate": halted / len(logits)}

    named = [(name, "tpr", list(v)) for name, v in harmful.items()]
    named += [(f"attack {name}", "tpr", v) for name, v in attacks.items()]
    named += [(name, "fpr", list(v)) for name, v in benign.items()]
    overlaps, independence = _check_overlap(probe, named, allow_overlap)
    for name, metric, examples in named:
        logits = response_logits(model, tokenizer, probe, examples, desc=name, **options) if examples else None
        if logits is not None:
            maxima[name] = (metric, logits)
        row(name, metric, logits)
    if samples is not None:
        found = [maxima[f"attack {a}"][1] for a in attacks if f"attack {a}" in maxima]
        row("attacks (all)", "tpr", torch.cat(found) if found else None)
        order = [n for n, m, _ in named if m == "tpr"] + ["attacks (all)"] + [n for n, m, _ in named if m == "fpr"]
        rows = {name: rows[name] for name in order}
    for name, counts in overlaps.items():
        rows[name]["overlap"] = counts
    pos = [l for m, l in maxima.values() if m == "tpr"]
    neg = [l for m, l in maxima.values() if m == "fpr"]
    result = {
        "kind": probe.kind, "layer": probe.layer, "threshold": probe.threshold,
        "threshold_logit": probe.threshold_logit, "target_fpr": probe.target_fpr,
        "max_tokens_per_item": max_tokens_per_item, "samples": str(samples) if samples is not None else None,
        "sets": rows, "auroc": auroc(torch.cat(pos), torch.cat(neg)) if pos and neg else None,
        "calibration": {k: v for k, v in (probe.info.get("calibration") or {}).items()},
        "independence": independence,
    }
    if print_table:
        print(format_table(result))
    return result


def _check_overlap(probe: Probe, named: list, allow_overlap: bool) -> tuple[dict, str]:
    """({set name: {"fitted", "calibration", "responses"}} for overlapping sets, "checked"|"unchecked")."""
    ids = probe.info.get("item_ids") or {}
    if "calibration" not in ids:
        warnings.warn("the probe's probe.json records no item keys (`item_ids`; a probe trained before they were "
                      "recorded): cannot check that the evaluation sets are disjoint from the items it was fitted "
                      "and calibrated on. Probes of that version calibrated on benign.test and borderline.test "
                      "by default, so their FPR there is in-sample. Retrain it for a checked evaluation.",
                      ProbeOverlapWarning, stacklevel=3)
        return {}, "unchecked"
    calibrated, fitted = set(ids.get("calibration", ())), set(ids.get("training", ()))
    overlaps = {}
    for name, _, examples in named:
        keys = [item_key(e) for e in examples]
        counts = {"fitted": sum(k in fitted for k in keys), "calibration": sum(k in calibrated for k in keys)}
        if counts["fitted"] or counts["calibration"]:
            overlaps[name] = dict(counts, responses=len(keys))
    if not overlaps:
        return {}, "checked"
    detail = "; ".join(f"{name}: {c['calibration']} of {c['responses']} responses calibrated the threshold, "
                       f"{c['fitted']} were fitted on" for name, c in overlaps.items())
    if not allow_overlap:
        raise ProbeError(f"refusing to report in-sample rates: {detail}. An FPR on calibration responses is at "
                         f"most the target by construction and a rate on fitted items is optimistic; evaluate on "
                         f"other sets (the defaults harmful.test, benign.test and borderline.test are disjoint "
                         f"from a default-trained probe) or pass --allow-overlap (allow_overlap=True) to report "
                         f"them anyway, marked in-sample")
    warnings.warn(f"IN-SAMPLE: {detail}; these rows are not independent estimates", ProbeOverlapWarning,
                  stacklevel=3)
    return overlaps, "checked"


def format_table(result: dict) -> str:
    lines = [f"{result['kind']} probe, layer {result['layer']}, threshold {result['threshold']:.6g} "
             f"(logit {result['threshold_logit']:.4g}, target FPR {result['target_fpr']})",
             f"{'set':<40} {'metric':>6} {'responses':>9} {'halted':>7} {'rate':>7}"]
    for name, row in result["sets"].items():
        rate = "-" if row["rate"] is None else f"{row['rate']:.3f}"
        mark = ""
        if row.get("overlap"):
            o = row["overlap"]
            mark = f"  IN-SAMPLE ({o['calibration']} calibration, {o['fitted']} fitted items)"
        lines.append(f"{name:<40} {row['metric'].upper():>6} {row['responses']:>9} {row['halted']:>7} {rate:>7}{mark}")
    if result.get("auroc") is not None:
        lines.append(f"per-response AUROC (harmful and attack rows vs benign rows): {result['auroc']:.3f}")
    calibration = result.get("calibration") or {}
    if calibration.get("responses"):
        sets = calibration.get("sets")
        where = " + ".join(f"{name} {s['items']}" for name, s in sets.items()) if sets else "sets not recorded"
        tripped = calibration.get("tripped")
        halted = f"{tripped}/{calibration['responses']} = " if tripped is not None else ""
        lines.append(f"threshold calibrated on {calibration['responses']} responses ({where}): "
                     f"calibration FPR {halted}{calibration.get('achieved_fpr', float('nan')):.3f}")
    if result.get("independence") == "unchecked":
        lines.append("independence NOT checked: the probe records no item keys (see the warning)")
    return "\n".join(lines)
