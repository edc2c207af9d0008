"""Capability retention and over-refusal, measured locally (evaluation.md section 1).

- `agreement`: greedy answers of the model and the original (baseline) on the built-in benign
  test prompts: exact-match rate and mean token-overlap F1 (SQuAD-style: lower-cased words,
  punctuation removed, bag-of-words precision/recall).
- `perplexity`: token-weighted perplexity of each model on held-out benign responses
  (`generated_set("benign", "test")`, written by the original model): exp(total NLL / tokens)
  over response tokens only.
- `over_refusal`: heuristic-judge labels of greedy answers to the borderline (XSTest-style) and
  benign test prompts: refusal rate, broken-down rate, and "not answered" = refusal + broken-down
  (a circuit-broken model's over-refusal includes broken-down output). Perplexity for the
  broken-down check is taken under the original model when it is given.
- `lm_eval`: lm-evaluation-harness tasks, only when `lm_eval` is installed and the model is a
  directory; otherwise the command to run by hand is recorded.
"""

from __future__ import annotations

import importlib.util
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ..data.schema import DataError, Example
from ..generation import generate, with_system_prompt
from ..judges.base import LABELS
from ..judges.heuristic import HeuristicJudge, response_nll
from .stats import mean_interval, wilson_interval

LM_EVAL_TASKS = ("mmlu", "arc_challenge", "hellaswag", "truthfulqa_mc2", "winogrande", "gsm8k")


def lm_eval_command(model_dir: str, tasks: Sequence[str] = LM_EVAL_TASKS) -> str:
    return f"lm_eval --model hf --model_args pretrained={model_dir} --tasks {','.join(tasks)} --batch_size auto"


def _words(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts (1.0 when both are empty)."""
    pred, ref = _words(prediction), _words(reference)
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_agreement(outputs: Sequence[str], references: Sequence[str]) -> dict:
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    n = len(outputs)
    exact = sum(re.sub(r"\s+", " ", a).strip() == re.sub(r"\s+", " ", b).strip() for a, b in zip(outputs, references))
    f1 = [token_f1(a, b) for a, b in zip(outputs, references)]
    return {"exact_match": exact / n if n else None, "token_f1": sum(f1) / n if n else None, "n": n,
            "token_f1_ci95": list(mean_interval(f1)) if n > 1 else None}


def heldout_perplexity(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8,
                       system_prompt: str | None = None) -> dict:
    """Token-weighted perplexity of the examples' responses under `model` (after `system_prompt`, if given)."""
    scored = response_nll(model, tokenizer, [with_system_prompt(e.conversation(), system_prompt) for e in examples],
                          [e.response for e in examples], batch_size=batch_size)
    nll = sum(s for s, _ in scored)
    tokens = sum(n for _, n in scored)
    return {"perplexity": math.exp(nll / tokens) if tokens else None, "n": len(examples), "tokens": tokens}


def label_rates(verdicts: Sequence) -> dict:
    counts = Counter(v.label for v in verdicts)
    n = len(verdicts)
    rate = (lambda k: counts.get(k, 0) / n if n else None)
    not_answered = counts.get("refusal", 0) + counts.get("broken-down", 0)
    return {"refusal_rate": rate("refusal"), "broken_down_rate": rate("broken-down"),
            "not_answered_rate": not_answered / n if n else None,
            "not_answered_ci95": list(wilson_interval(not_answered, n)) if n else None,
            "n": n, "labels": {label: counts.get(label, 0) for label in LABELS}}


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model_dir: str | Path, tasks: Sequence[str] = LM_EVAL_TASKS, *, batch_size: int | str = "auto",
                limit: int | None = None) -> dict:
    """lm-evaluation-harness on a saved model directory (optional dependency; not used by tests)."""
    if not lm_eval_available():
        return {"skipped": "lm_eval is not installed (pip install lm-eval)", "command": lm_eval_command(str(model_dir), tasks)}
    import lm_eval  # type: ignore

    output = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=list(tasks),
                                     batch_size=batch_size, limit=limit)
    return {"tasks": list(tasks), "results": output.get("results", {}), "command": lm_eval_command(str(model_dir), tasks)}


def _load_prompts(name: str, limit: int | None) -> list[Example]:
    from ..data.builtin import builtin_prompts

    return builtin_prompts(name, "test")[:limit]


def capability_report(model, tokenizer, baseline=None, *, limit: int | None = None, max_new_tokens: int = 64,
                      batch_size: int = 16, progress: bool = False, model_dir: str | None = None,
                      baseline_dir: str | None = None, lm_eval_tasks: Sequence[str] | None = None,
                      samples_out: str | Path | None = None, judge=None, system_prompt: str | None = None) -> dict:
    """Agreement with the baseline, held-out perplexity, over-refusal, and lm-eval when available; every prompt
    after `system_prompt` when given (lm-eval excepted).

    `baseline` is the original model (same tokenizer) or None. `samples_out`, when given, receives
    every generated answer as JSONL (prompt, prompt_kind, model before|after, output, label), the
    raw material for the hand-labelled judge-agreement set. `judge` labels the answers (default: the
    heuristic judge with the baseline, else the model, as perplexity reference).
    """
    from ..data.loaders import write_jsonl

    models: list[tuple[str, Any]] = [("model", model)] + ([("baseline", baseline)] if baseline is not None else [])
    reference = baseline if baseline is not None else model
    judge = judge if judge is not None else HeuristicJudge(model=reference, tokenizer=tokenizer)
    report: dict[str, Any] = {"max_new_tokens": max_new_tokens, "limit": limit, "judge": judge.name,
                              "perplexity_reference": "baseline" if baseline is not None else "model",
                              "system_prompt": system_prompt}
    answers: dict[str, dict[str, list[str]]] = {name: {} for name, _ in models}
    prompts = {kind: _load_prompts(kind, limit) for kind in ("benign", "borderline")}
    samples = []
    over_refusal: dict[str, dict] = {}
    for name, m in models:
        over_refusal[name] = {}
        for kind, examples in prompts.items():
            conversations = [with_system_prompt(e.conversation(), system_prompt) for e in examples]
            outputs = generate(m, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress, desc=f"{name}/{kind}")
            answers[name][kind] = outputs
            verdicts = judge.label_batch([e.request or "" for e in examples], outputs, harmful_prompt=False)
            over_refusal[name][kind] = label_rates(verdicts)
            for e, o, v in zip(examples, outputs, verdicts):
                samples.append({"id": f"{kind}-{(e.source or '').rsplit(':', 1)[-1]}", "prompt": e.request,
                                "prompt_kind": kind, "attack": "direct",
                                "model": "after" if name == "model" else "before", "output": o,
                                "judge": judge.name, "judge_label": v.label, "judge_reason": v.reason})
    report["over_refusal"] = over_refusal
    if baseline is not None:
        report["agreement"] = answer_agreement(answers["model"]["benign"], answers["baseline"]["benign"])
    else:
        report["agreement"] = {"skipped": "no baseline model to compare with"}

    try:
        from ..data.builtin import generated_set

        heldout = generated_set("benign", "test")[:limit]
        report["perplexity"] = {name: heldout_perplexity(m, tokenizer, heldout, batch_size=max(1, batch_size // 2),
                                                         system_prompt=system_prompt) for name, m in models}
        report["perplexity"]["source"] = "generated_set('benign', 'test')"
    except DataError as err:
        report["perplexity"] = {"skipped": str(err)}

    tasks = tuple(lm_eval_tasks or LM_EVAL_TASKS)
    if lm_eval_tasks and lm_eval_available() and model_dir and Path(model_dir).is_dir():
        report["lm_eval"] = {"model": run_lm_eval(model_dir, tasks)}
        if baseline_dir and Path(baseline_dir).is_dir():
            report["lm_eval"]["baseline"] = run_lm_eval(baseline_dir, tasks)
    else:
        why = ("lm_eval is not installed" if not lm_eval_available() else
               "pass lm_eval_tasks and a model directory" if not lm_eval_tasks or not model_dir else
               f"{model_dir} is not a directory")
        report["lm_eval"] = {"skipped": why, "command": lm_eval_command(model_dir or "OUT/model", tasks)}
    if samples_out is not None:
        write_jsonl(samples_out, samples)
    return report
