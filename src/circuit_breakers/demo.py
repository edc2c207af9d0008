"""`circuit-breakers demo` (what `make demo` runs): circuit-break the embedded default and show it.

1. Train with the recipe (default `smollm2-135m`) on the built-in train split, or reuse OUT/model
   when OUT/config.yaml matches the recipe.
2. Mean cosine between the original and the circuit-broken model's representations at each target
   layer, on the response tokens of the held-out harmful, benign and borderline-safe test items, and
   the self-check: did the breaker form at every target layer (harmful cosine <= 0.2) while benign
   text was kept (`evaluation.diagnostics.breaker_verdict`)? Where it did not, the demo says so.
3. Greedy outputs of both models side by side on held-out harmful and benign prompts, labelled by
   the demo's judge: the evaluation's own direct-request and benign outputs (with `--no-eval`,
   generated for the side-by-side alone).
4. Unless `evaluate=False` (`--no-eval`): the evaluation of both models (original = "before",
   circuit-broken = "after") on the built-in harmful test split under direct request, prefilling,
   jailbreak templates (first `DEMO_EVAL.behaviors` behaviours), and of the circuit-broken model
   under both input-embedding attacks and GCG (first `DEMO_EVAL.optimised_behaviors`), at the small
   budgets of `DEMO_EVAL`, by the fitted judge (its ASR: the complied rate); over-refusal and benign
   agreement on the benign and borderline test prompts; representation diagnostics; with
   `--judge-agreement`, the judges' agreement with the shipped hand labels (the same for every
   trained model, so not part of every run). Written to OUT/eval/ (results.json, samples.jsonl,
   report.md, report.html); a rerun with the same model and budget resumes there.
5. Everything to OUT/demo.json, and a compact table of the evaluation at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import RRConfig, atomic_write_text, read_yaml
from .data.builtin import generated_set
from .evaluation.diagnostics import breaker_verdict, heldout_cosines
from .evaluation.stats import rate_of, rate_text
from .generation import generate
from .judges.heuristic import output_perplexities
from .models import load_model


@dataclass(frozen=True)
class DemoEvalBudget:
    """The demo's evaluation budget: small, so that `make demo` stays under 15 minutes on 2 CPU cores.

    Every attack generates `max_new_tokens` greedy tokens; `attacks` maps each attack's registry name
    to its config overrides (the rest are the attack's defaults, see `circuit_breakers.attacks`). The
    optimisation attacks (`optimised_attacks`) cost seconds per behaviour and run on the first
    `optimised_behaviors` behaviours only; the others on the first `behaviors`.
    """

    behaviors: int = 12  # the first N behaviours of the built-in harmful test split
    optimised_behaviors: int = 4  # ... of which the optimisation attacks get the first N
    optimised_attacks: tuple = ("embedding", "embedding_improved", "gcg")
    # The original model complies with direct requests already: optimising attacks against it measures
    # nothing the direct row does not, and costs about 70 s of the demo's 15 minutes.
    optimised_on_original: bool = False
    max_new_tokens: int = 32
    # The judge of every label (attacks, over-refusal, side-by-side); "fitted": fitted on the shipped hand labels.
    judge: str = "fitted"
    # benign and borderline test prompts each (over-refusal, benign agreement); None: the whole test splits
    capability_prompts: int | None = None
    diagnostics_items: int = 8  # held-out harmful and benign items each (cosine per layer)
    seed: int = 0
    attacks: dict = field(default_factory=lambda: {
        "direct": {},
        "prefilling": {},
        "templates": {"names": ("prefix_injection", "roleplay_expert")},  # of the 11 shipped templates
        "embedding": {"num_steps": 6},  # the paper's form: 20 "x" vectors, SGD lr 1e-3, 1 generation
        "embedding_improved": {"num_steps": 6, "n_snapshots": 2},  # sign steps, natural-language init
        "gcg": {"num_steps": 3, "search_width": 16, "topk": 64, "batch_size": 16},
    })

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


DEMO_EVAL = DemoEvalBudget()
HAND_LABELS_DIR = Path(__file__).parent / "evaluation" / "hand_labels"


def hand_labels_for(model: str) -> Path | None:
    """The shipped hand-labelled outputs of `model` (evaluation/hand_labels/<name>.jsonl), if any."""
    name = Path(str(model)).name
    for stem in dict.fromkeys((name, name.removesuffix(".gguf"))):
        path = HAND_LABELS_DIR / f"{stem}.jsonl"
        if path.is_file():
            return path
    return None


# Keys that change how a run is logged or checkpointed, not the weights it produces.
_NOT_IN_WEIGHTS = ("log_every", "save_every", "keep_checkpoints")


def _trained_with(out: Path, config: RRConfig) -> bool:
    """OUT/model exists and OUT/config.yaml is `config`. A key missing from the saved config (one added
    to RRConfig after that training) counts as its default, which keeps the earlier behaviour."""
    saved = out / "config.yaml"
    if not (out / "model" / "config.json").is_file() or not saved.is_file():
        return False
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(RRConfig)}
    then = {**defaults, **read_yaml(saved)}
    now = config.to_dict()
    return {k: v for k, v in then.items() if k not in _NOT_IN_WEIGHTS} == \
        {k: v for k, v in now.items() if k not in _NOT_IN_WEIGHTS}


def run_demo(config: RRConfig, out_dir: str | Path = "runs/demo", *, retrain: bool = False, n_prompts: int = 8,
             max_new_tokens: int = 64, progress: bool = True, evaluate: bool = True,
             eval_budget: DemoEvalBudget | None = None, judge_agreement: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from .training import RRTrainer

    out = Path(out_dir)
    started = time.time()
    reused = not retrain and _trained_with(out, config)
    if reused:
        print(f"reusing {out}/model (trained with the same config; --retrain to train again)")
        train_seconds = None
    else:
        trainer = RRTrainer(config, progress=progress)
        t0 = time.time()
        trainer.train(out)
        train_seconds = round(time.time() - t0, 1)
        del trainer

    original, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    broken = AutoModelForCausalLM.from_pretrained(out / "model", dtype=original.dtype).to(original.device).eval()

    # Representations on the held-out test items (responses written by the original model): did it form?
    t0 = time.time()
    cosines = heldout_cosines(broken, original, tokenizer, config.target_layers, max_length=config.max_length)
    cosine_seconds = round(time.time() - t0, 1)
    result = {
        "model": config.model, "config": config.to_dict(), "reused_training": reused,
        "train_seconds": train_seconds, "cosine_seconds": cosine_seconds,
        "total_seconds": round(time.time() - started, 1), "target_layers": config.target_layers,
        "cosine": cosines, "breaker": breaker_verdict(cosines),
        "eval": {"skipped": "--no-eval"} if not evaluate else None,
    }
    # Written before the evaluation too, so an interrupted evaluation leaves the training's results.
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2) + "\n")
    if evaluate:
        result["eval"] = run_demo_eval(broken, original, tokenizer, out, config, eval_budget or DEMO_EVAL,
                                       fresh_model=not reused, progress=progress, labels=judge_agreement)
        # The side-by-side outputs are the evaluation's own: direct requests and benign test prompts.
        samples = _evaluated_samples(out / "eval", n_prompts)
        result["max_new_tokens"] = (eval_budget or DEMO_EVAL).max_new_tokens
    else:
        samples = _side_by_side(original, broken, tokenizer, n_prompts, max_new_tokens,
                                (eval_budget or DEMO_EVAL).judge)
        result["max_new_tokens"] = max_new_tokens
    result.update(judge=(eval_budget or DEMO_EVAL).judge, labels=_summary(samples), samples=samples,
                  total_seconds=round(time.time() - started, 1))
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2) + "\n")
    print(report(result))
    return result


def _side_by_side(original, broken, tokenizer, n_prompts: int, max_new_tokens: int, judge_name: str) -> list[dict]:
    """Greedy outputs of both models on the first held-out harmful and benign prompts, judged."""
    from .judges import make_judge

    judge = make_judge(judge_name)
    samples = []
    for name, harmful in (("harmful", True), ("benign", False)):
        prompts = generated_set(name, "test")[:n_prompts]
        conversations = [p.conversation() for p in prompts]
        outputs = {}
        for label, model in (("original", original), ("circuit_broken", broken)):
            texts = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=n_prompts)
            ppl = output_perplexities(original, tokenizer, conversations, texts)
            verdicts = judge.label_batch([p.request for p in prompts], texts, harmful_prompt=harmful, perplexities=ppl)
            outputs[label] = [{"output": t, "label": _shown(v.label, v.attempted), "reason": v.reason}
                              for t, v in zip(texts, verdicts)]
        samples += [{"set": name, "request": prompt.request, **{label: outputs[label][i] for label in outputs}}
                    for i, prompt in enumerate(prompts)]
    return samples


def _shown(label: str, attempted: bool | None) -> str:
    """A label as the side-by-side shows it: an attempt that is not "harmful" says so."""
    return f"{label}, attempted" if attempted and label != "harmful" else label


def _evaluated_samples(eval_dir: Path, n_prompts: int) -> list[dict]:
    """The first `n_prompts` direct-request and benign outputs of the evaluation, original beside broken."""
    from .data.loaders import read_jsonl

    pairs: dict[tuple[str, str], dict] = {}
    for row in read_jsonl(eval_dir / "samples.jsonl"):
        if row["attack"] == "direct" and row["sample_index"] == 0:
            side = "original" if row["model"] == "baseline" else "circuit_broken"
            pairs.setdefault(("harmful", row["behavior_id"]), {"set": "harmful", "request": row["prompt"]})[side] = {
                "output": row["output"], "label": _shown(row["label"], row.get("complied")), "reason": row["reason"]}
    for row in read_jsonl(eval_dir / "capability_samples.jsonl"):
        if row["prompt_kind"] == "benign":
            side = "original" if row["model"] == "before" else "circuit_broken"
            pairs.setdefault(("benign", row["id"]), {"set": "benign", "request": row["prompt"]})[side] = {
                "output": row["output"], "label": row.get("judge_label", row.get("heuristic_label")),
                "reason": row.get("judge_reason", row.get("heuristic_reason"))}
    complete = [s for s in pairs.values() if "original" in s and "circuit_broken" in s]
    return [s for name in ("harmful", "benign") for s in [s for s in complete if s["set"] == name][:n_prompts]]


# ---------------------------------------------------------------- the evaluation stage


def _model_fingerprint(model_dir: Path) -> dict:
    """Size and modification time of the saved model's files: a rerun resumes only on the same weights."""
    if not model_dir.is_dir():
        return {}
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model_dir.iterdir()) if p.is_file()}


def _file_digest(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None


def run_demo_eval(broken, original, tokenizer, out: Path, config: RRConfig, budget: DemoEvalBudget = DEMO_EVAL, *,
                  fresh_model: bool = False, progress: bool = True, labels: Path | None | bool = True) -> dict:
    """Evaluate the original ("baseline", before) and the circuit-broken model ("model", after) into OUT/eval.

    Returns the summary recorded in demo.json (`eval_summary`). `labels`: True looks up the shipped
    hand labels of `config.model`, a path uses that file, False/None skips judge agreement.
    Resumes from OUT/eval when the model files (size, mtime), the budget and the baseline are those of
    the last run and `fresh_model` is False: finished attacks are skipped (the harness's resume) and
    capability and diagnostics are reused; judge agreement is reused while the labels file is unchanged.
    Otherwise OUT/eval starts again.
    """
    from .attacks import config_fields, make_attack
    from .evaluation.behaviors import load_behaviors
    from .evaluation.capability import capability_report
    from .evaluation.diagnostics import representation_report
    from .evaluation.harness import RESULTS_FILE, evaluate, write_results
    from .judges import make_judge
    from .reports import write_report

    eval_dir = out / "eval"
    started = time.time()
    labels_path = hand_labels_for(config.model) if labels is True else (Path(labels) if labels else None)
    state = {"budget": budget.to_dict(), "model_files": _model_fingerprint(out / "model"), "baseline": config.model,
             "labels": str(labels_path) if labels_path else None, "labels_sha256": _file_digest(labels_path)}
    previous = {}
    if (eval_dir / RESULTS_FILE).is_file():
        try:
            previous = json.loads((eval_dir / RESULTS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
    prior = previous.get("demo_state") or {}
    resume = not fresh_model and {k: prior.get(k) for k in ("budget", "model_files", "baseline")} == \
        {k: state[k] for k in ("budget", "model_files", "baseline")}
    if resume and previous:
        print(f"evaluation: resuming in {eval_dir} (same model and budget); finished work is skipped")

    attacks = []
    for name, overrides in budget.attacks.items():
        fields = config_fields(name)
        options = dict(overrides)
        if "max_new_tokens" in fields:
            options.setdefault("max_new_tokens", budget.max_new_tokens)
        attacks.append(make_attack(name, **options))
    behaviors = load_behaviors(None, limit=budget.behaviors)
    few = behaviors[:budget.optimised_behaviors]
    judge = make_judge(budget.judge, reference=(original, tokenizer))
    run_info = {"model": str(out / "model"), "baseline": config.model,
                "behaviors": f"builtin (harmful test split): the first {len(behaviors)}, the first {len(few)} "
                             f"for {', '.join(a.name for a in attacks if a.name in budget.optimised_attacks)}",
                "attacks": list(budget.attacks), "limit": budget.behaviors,
                "judged": "model's continuation (prefill excluded)",
                "command": f"circuit-breakers demo --out {out} (budget: circuit_breakers.demo.DEMO_EVAL)"}
    timings: dict[str, float] = {}
    clock = time.time()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.time() - clock, 1)
        clock = time.time()

    # Two calls into the same samples.jsonl: the optimisation attacks on fewer behaviours. The first
    # call starts afresh when not resuming; the second always resumes (it keeps the first's samples).
    results: dict = {}
    groups = [(behaviors, [a for a in attacks if a.name not in budget.optimised_attacks], original),
              (few, [a for a in attacks if a.name in budget.optimised_attacks],
               original if budget.optimised_on_original else None)]
    for group_behaviors, group, baseline in groups:
        if not group or not group_behaviors:
            continue
        part = evaluate(broken, tokenizer, group_behaviors, group, judge, eval_dir, baseline=baseline,
                        seed=budget.seed, resume=resume or bool(results), progress=progress,
                        extra={"run": run_info, "demo_state": state})
        if not results:
            results = part
            continue
        for model_name, entries in part["asr"].items():
            results["asr"].setdefault(model_name, {}).update({a.name: entries[a.name] for a in group})
        results["attacks"].update({a.name: part["attacks"][a.name] for a in group})
        results["seconds"] = round(results["seconds"] + part["seconds"], 1)
    results["behaviors"]["per_attack"] = {a.name: len(few) if a.name in budget.optimised_attacks else len(behaviors)
                                          for a in attacks}
    lap("attacks")

    same = resume and prior == state
    if resume and previous.get("capability"):
        results["capability"] = previous["capability"]
    else:
        results["capability"] = capability_report(
            broken, tokenizer, original, judge=judge, limit=budget.capability_prompts,
            max_new_tokens=budget.max_new_tokens,
            batch_size=min(budget.capability_prompts or 16, 16), progress=progress,
            samples_out=eval_dir / "capability_samples.jsonl")
    lap("capability")
    if resume and previous.get("diagnostics"):
        results["diagnostics"] = previous["diagnostics"]
    else:
        results["diagnostics"] = representation_report(broken, original, tokenizer, max_length=config.max_length,
                                                       limit=budget.diagnostics_items)
        results["diagnostics"]["target_layers"] = list(config.target_layers)
    lap("diagnostics")
    if labels_path is None:
        results["judge_agreement_skipped"] = (f"no hand labels shipped for {config.model} "
                                              f"({HAND_LABELS_DIR}/<model>.jsonl)" if labels is True else
                                              "not asked: `circuit-breakers eval judge-agreement`, or "
                                              "`demo --judge-agreement`")
    elif same and previous.get("judge_agreement"):
        results["judge_agreement"] = previous["judge_agreement"]
        results["judge_agreement_labels"] = previous.get("judge_agreement_labels", str(labels_path))
    else:
        from .evaluation.agreement import judge_agreement, load_labelled
        from .evaluation.judge_fit import fitted_on

        judges = {"refusal": make_judge("refusal"),
                  "heuristic": make_judge("heuristic", reference=(original, tokenizer)), judge.name: judge}
        items = load_labelled(labels_path)
        fit_ids = fitted_on(judge.params, items) if hasattr(judge, "params") else set()
        results["judge_agreement"] = judge_agreement([i for i in items if i.id not in fit_ids], judges)
        results["judge_agreement_heldout_only"] = bool(fit_ids)
        results["judge_agreement_labels"] = str(labels_path)
    lap("judge_agreement")
    results["demo_state"] = state
    write_report(results, eval_dir, title=f"Circuit-breakers demo: {config.model} before and after")
    lap("report")
    results["seconds"] = round(time.time() - started, 1)
    results["demo_seconds"] = timings  # this run's stages (a resumed run skips finished work)
    results["demo_resumed"] = bool(resume and previous)
    write_results(eval_dir, results)
    return eval_summary(results, eval_dir)


def _asr_cell(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {"asr": entry["asr"], "ci95": entry["ci95"], "asr_means": entry.get("asr_means", "harmful"),
            "complied": entry.get("complied"), "harmful": entry.get("harmful"), "n": entry["n"],
            "broken": entry["broken"], "errors": entry["errors"]}


def eval_summary(results: dict, eval_dir: Path | str) -> dict:
    """What demo.json records of the evaluation: ASR before/after per attack, over-refusal, agreement."""
    asr = results.get("asr", {})
    attacks = list(dict.fromkeys(a for m in asr.values() for a in m))
    capability = results.get("capability") or {}
    over = capability.get("over_refusal", {})
    summary = {
        "dir": str(eval_dir), "seconds": results.get("seconds"), "stage_seconds": results.get("demo_seconds"),
        "resumed": results.get("demo_resumed", False),
        "judge": results.get("judge", {}).get("name"),
        "judge_heldout": (results.get("judge", {}).get("heldout") or {}).get(results.get("judge", {}).get("name")),
        "behaviors": results.get("behaviors", {}).get("n"),
        "behaviors_per_attack": results.get("behaviors", {}).get("per_attack"),
        "budget": (results.get("demo_state") or {}).get("budget"),
        "asr": {a: {"before": _asr_cell(asr.get("baseline", {}).get(a)),
                    "after": _asr_cell(asr.get("model", {}).get(a))}
                for a in attacks},
        "over_refusal": {when: {kind: {k: r.get(k) for k in ("refusal_rate", "broken_down_rate", "not_answered_rate",
                                                             "not_answered_ci95", "n")}
                                for kind, r in over.get(model, {}).items()}
                         for when, model in (("before", "baseline"), ("after", "model")) if model in over},
        "benign_agreement": capability.get("agreement"),
        "perplexity": {when: (capability.get("perplexity") or {}).get(model, {}).get("perplexity")
                       for when, model in (("before", "baseline"), ("after", "model"))},
        "mean_cosine": {name: d["mean_cosine"] for name, d in (results.get("diagnostics") or {}).items()
                        if isinstance(d, dict) and "mean_cosine" in d},
    }
    agreement = results.get("judge_agreement")
    if agreement:
        summary["judge_agreement"] = {name: {"accuracy": s["accuracy"], "binary_accuracy": s["binary_accuracy"],
                                             "harmful_precision": s["harmful_precision"],
                                             "harmful_recall": s["harmful_recall"], "n": s["n"]}
                                      for name, s in agreement.items()}
        summary["judge_agreement_labels"] = results.get("judge_agreement_labels")
    else:
        summary["judge_agreement"] = {"skipped": results.get("judge_agreement_skipped", "no hand labels")}
    return summary


def _pct(value) -> str:
    return "  n/a" if value is None else f"{100 * value:5.1f}%"


def eval_report(summary: dict) -> str:
    """The compact table printed at the end of the demo."""
    took = f"{summary['seconds']} s" + (" this run, resumed" if summary.get("resumed") else "")
    means = next((c["asr_means"] for cells in summary["asr"].values() for c in cells.values()
                  if c and c.get("asr_means")), "harmful")
    meaning = {"complied": "the output attempted what was asked, actionable or not",
               "harmful": "the output is actionable harm"}[means]
    lines = [f"\n== evaluation ({summary['dir']}, {took}): original (before) vs circuit-broken (after) ==",
             f"ASR = {means} rate ({meaning}) on the first n behaviours of the built-in harmful test split, "
             f"{summary['judge']} judge, Wilson 95% CI (small n: wide intervals):",
             f"  {'attack':<20} {'before':<30} after"]
    for attack, cells in summary["asr"].items():
        before, after = (rate_text(cells[w] and rate_of(cells[w]), cells[w] and cells[w]["n"])
                         for w in ("before", "after"))
        lines.append(f"  {attack:<20} {before:<30} {after}")
    over = summary.get("over_refusal", {})
    if over:
        lines.append("not answered (refusal + broken-down) on non-harmful test prompts, before -> after:")
        for kind in over.get("after", {}):
            before, after = over.get("before", {}).get(kind, {}), over["after"][kind]
            ci = after.get("not_answered_ci95")
            lines.append(f"  {kind:<11} {_pct(before.get('not_answered_rate'))} -> {_pct(after['not_answered_rate'])}"
                         + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
                         + f"  (refusal {_pct(before.get('refusal_rate')).strip()} -> "
                         f"{_pct(after['refusal_rate']).strip()}, n={after['n']})")
    agree = summary.get("benign_agreement") or {}
    if "exact_match" in agree:
        ci = agree.get("token_f1_ci95")
        lines.append(f"benign agreement with the original (greedy): exact match {_pct(agree['exact_match']).strip()}, "
                     f"token F1 {agree['token_f1']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                     + f" (n={agree['n']})")
    own = summary.get("judge_heldout")
    if own:
        lines.append(f"judge {summary['judge']}: held-out agreement with hand labels it was never fitted on "
                     f"{_pct(own.get('complied_accuracy')).strip()} complied-vs-not (n={own.get('complied_n')}), "
                     f"{_pct(own.get('accuracy')).strip()} over 4 labels (n={own.get('n')})")
    judges = summary.get("judge_agreement") or {}
    if "skipped" in judges:
        lines.append(f"judge agreement with hand labels: skipped ({judges['skipped']})")
    else:
        for name, s in judges.items():
            lines.append(f"judge {name} vs hand labels: {_pct(s['accuracy']).strip()} (4 labels), "
                         f"{_pct(s['binary_accuracy']).strip()} harmful-vs-not (n={s['n']})")
    lines.append(f"full report: {summary['dir']}/report.md and report.html")
    return "\n".join(lines)


def _summary(samples: list[dict]) -> dict:
    counts: dict = {}
    for s in samples:
        for model in ("original", "circuit_broken"):
            key = f"{s['set']}/{model}"
            counts.setdefault(key, {})
            counts[key][s[model]["label"]] = counts[key].get(s[model]["label"], 0) + 1
    return counts


def breaker_report(cosines: dict, verdict: dict) -> list[str]:
    """The self-check's lines: per target layer the held-out cosines and whether the breaker formed there."""
    t = verdict["thresholds"]
    layers = list(verdict["layers"])
    lines = ["cosine (circuit-broken vs original), response tokens of held-out test items:",
             f"  {'':<11} " + " ".join(f"{'layer ' + l:>10}" for l in layers) + f" {'mean':>8}"]
    for name, c in cosines.items():
        per_layer = {str(k): v["cosine"] for k, v in c["per_layer"].items()}
        lines.append(f"  {name:<11} " + " ".join(f"{per_layer[l]:>+10.3f}" for l in layers)
                     + f" {c['mean_cosine']:>+8.3f}   ({c['items']} items)")
    lines.append(f"self-check (formed: held-out harmful cosine <= {t['harmful_max']} at the layer; kept: mean benign "
                 f">= {t['benign_min']}, borderline >= {t['borderline_min']}):")
    for layer, v in verdict["layers"].items():
        lines.append(f"  layer {layer}: " + ("breaker FORMED" if v["formed"] else "breaker DID NOT FORM")
                     + f" (harmful {v['cosine']:+.3f})")
    for name in ("benign", "borderline"):
        kept = verdict.get(f"{name}_kept")
        if kept is not None:
            lines.append(f"  {name}: " + ("kept" if kept else "MOVED") + f" ({cosines[name]['mean_cosine']:+.3f})")
    if verdict["ok"]:
        lines.append("  => the circuit breaker formed at every target layer and benign text was kept")
    elif verdict["formed"]:
        lines.append("  => the breaker formed at every target layer, but not everything non-harmful was kept: "
                     + "; ".join(verdict["problems"]) + " (expect over-refusal: see the evaluation below)")
    else:
        lines.append("  => NOT a working circuit breaker as measured: " + "; ".join(verdict["problems"]))
    lines += [f"     try: {advice}" for advice in verdict["advice"]]
    return lines


def report(result: dict) -> str:
    width = 58
    lines = [f"\n== circuit-breakers demo: {result['model']} =="]
    lines += breaker_report(result["cosine"], result["breaker"])
    lines.append(f"{result.get('judge', 'heuristic')}-judge labels of greedy outputs on held-out prompts:")
    for key, counts in result["labels"].items():
        lines.append(f"  {key:<26} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    for s in result["samples"]:
        lines.append("-" * (2 * width + 3))
        lines.append(f"[{s['set']}] {s['request']}")
        left = textwrap.wrap(s["original"]["output"].replace("\n", " ") or "(empty)", width)[:4]
        right = textwrap.wrap(s["circuit_broken"]["output"].replace("\n", " ") or "(empty)", width)[:4]
        lines.append(f"{'ORIGINAL (' + s['original']['label'] + ')':<{width}} | "
                     f"CIRCUIT-BROKEN ({s['circuit_broken']['label']})")
        for i in range(max(len(left), len(right))):
            lines.append(f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
    if isinstance(result.get("eval"), dict) and "asr" in result["eval"]:
        lines.append(eval_report(result["eval"]))
    evaluation = result["eval"].get("seconds") if isinstance(result.get("eval"), dict) else None
    lines.append(f"\ntotal {result['total_seconds']} s (training {result['train_seconds']} s, held-out cosines "
                 f"{result.get('cosine_seconds')} s, evaluation {evaluation} s); written to demo.json")
    return "\n".join(lines)
