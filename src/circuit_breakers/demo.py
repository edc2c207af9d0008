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
4. Unless `evaluate=False` (`--no-eval`): the evaluation (`evaluation.pipeline.run_evaluation`, what
   `circuit-breakers eval` runs) of both models (original = "before", circuit-broken = "after") at the
   budget of the shipped eval config `quick` (`DEMO_EVAL`, evaluation/configs/quick.yaml): on the built-in
   harmful test split under direct request, prefilling, jailbreak templates (first `behaviors`
   behaviours), and of the circuit-broken model under both input-embedding attacks and GCG (first
   `optimised_behaviors`), by the fitted judge (its ASR: the complied rate); over-refusal and benign
   agreement on the benign and borderline test prompts; representation diagnostics; with
   `--judge-agreement`, the judges' agreement with the shipped hand labels (the same for every
   trained model, so not part of every run). Written to OUT/eval/ (results.json, samples.jsonl,
   report.md, report.html); a rerun with the same model and budget resumes there.
5. Everything to OUT/demo.json, and a compact table of the evaluation at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import time
from pathlib import Path

from .atomic import atomic_write_text
from .config import RRConfig, read_yaml, recipe_path
from .evaluation.pipeline import EvalConfig, load_eval_config
from .evaluation.stats import asr_text

# The demo's evaluation budget: the shipped eval config `quick`, sized so that `make demo` stays under 15
# minutes on 2 CPU cores (`circuit-breakers eval --eval-config quick` runs the same).
DEMO_EVAL: EvalConfig = load_eval_config("quick")
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


def trained_with(out: Path, config: RRConfig) -> bool:
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
             eval_budget: EvalConfig | None = None, judge_agreement: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from .evaluation.diagnostics import breaker_verdict, heldout_cosines
    from .models import load_model
    from .training import RRTrainer

    out = Path(out_dir)
    budget = eval_budget or DEMO_EVAL
    started = time.time()
    reused = not retrain and trained_with(out, config)
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
        result["eval"] = run_demo_eval(broken, original, tokenizer, out, config, budget, fresh_model=not reused,
                                       progress=progress, labels=judge_agreement)
        # The side-by-side outputs are the evaluation's own: direct requests and benign test prompts.
        samples = _evaluated_samples(out / "eval", n_prompts)
        result["max_new_tokens"] = budget.max_new_tokens
    else:
        samples = _side_by_side(original, broken, tokenizer, n_prompts, max_new_tokens, budget.judge)
        result["max_new_tokens"] = max_new_tokens
    result.update(judge=budget.judge, labels=_summary(samples), samples=samples,
                  total_seconds=round(time.time() - started, 1))
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2) + "\n")
    print(report(result))
    return result


def _side_by_side(original, broken, tokenizer, n_prompts: int, max_new_tokens: int, judge_name: str) -> list[dict]:
    """Greedy outputs of both models on the first held-out harmful and benign prompts, judged."""
    from .data.builtin import generated_set
    from .generation import generate
    from .judges import make_judge
    from .judges.heuristic import output_perplexities

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


def run_demo_eval(broken, original, tokenizer, out: Path, config: RRConfig, budget: EvalConfig | None = None, *,
                  fresh_model: bool = False, progress: bool = True, labels: Path | None | bool = True) -> dict:
    """Evaluate the original ("baseline", before) and the circuit-broken model ("model", after) into OUT/eval.

    Returns the summary recorded in demo.json (`eval_summary`). `budget` defaults to `DEMO_EVAL`. `labels`:
    True looks up the shipped hand labels of `config.model`, a path uses that file, False/None skips judge
    agreement. Resumes from OUT/eval when the model files (size, mtime), the budget and the baseline are
    those of the last run and `fresh_model` is False (see `run_evaluation`'s `state`); otherwise OUT/eval
    starts again.
    """
    from .evaluation.pipeline import run_evaluation
    from .models import model_fingerprint

    budget = budget or DEMO_EVAL
    eval_dir = out / "eval"
    labels_path = hand_labels_for(config.model) if labels is True else (Path(labels) if labels else None)
    skipped = (f"no hand labels shipped for {config.model} ({HAND_LABELS_DIR}/<model>.jsonl)" if labels is True else
               "not asked: `circuit-breakers eval judge-agreement`, or `demo --judge-agreement`")
    optimised = [name for name in budget.attacks if name in budget.optimised_attacks]
    run_info = {"model": str(out / "model"), "baseline": config.model,
                "behaviors": f"builtin (harmful test split): the first {budget.behaviors}, the first "
                             f"{budget.optimised_behaviors} for {', '.join(optimised)}",
                "attacks": list(budget.attacks), "limit": budget.behaviors,
                "judged": "model's continuation (prefill excluded)",
                "command": f"circuit-breakers demo --out {out} (budget: eval config quick)"}
    results = run_evaluation(
        broken, tokenizer, budget, eval_dir, baseline=(original, tokenizer), labels=labels_path,
        labels_skipped=skipped, target_layers=config.target_layers, max_length=config.max_length, run_info=run_info,
        title=f"Circuit-breakers demo: {config.model} before and after", resume=not fresh_model,
        state={"model_files": model_fingerprint(out / "model"), "baseline": config.model}, progress=progress)
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
        "dir": str(eval_dir), "seconds": results.get("seconds"), "stage_seconds": results.get("stage_seconds"),
        "resumed": results.get("resumed", False),
        "judge": results.get("judge", {}).get("name"),
        "judge_heldout": (results.get("judge", {}).get("heldout") or {}).get(results.get("judge", {}).get("name")),
        "behaviors": results.get("behaviors", {}).get("n"),
        "behaviors_per_attack": results.get("behaviors", {}).get("per_attack"),
        "budget": results.get("eval_config"),
        "asr": {a: {"before": _asr_cell(asr.get("baseline", {}).get(a)),
                    "after": _asr_cell(asr.get("model", {}).get(a))}
                for a in attacks},
        "over_refusal": {when: {kind: {k: r.get(k) for k in ("refusal_rate", "broken_down_rate", "not_answered_rate",
                                                             "not_answered_ci95", "n")}
                                for kind, r in over.get(model, {}).items()}
                         for when, model in (("before", "baseline"), ("after", "model")) if model in over},
        "benign_agreement": capability.get("agreement"),
        "tool_calls": _tool_call_cells(results.get("tool_capability")),
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


def _tool_call_cells(report: dict | None) -> dict | None:
    """Benign call accuracy before/after as {"n", "before"/"after": {"exact"/"right_tool"/"any_call": {"rate",
    "ci95", "correct"}}} (`evaluation.tool_capability`); None when no tool-use behaviours were evaluated."""
    if not report:
        return None
    cells = {"n": report["n"]}
    for when, model in (("before", "baseline"), ("after", "model")):
        if model in report:
            accuracy = report[model]
            cells[when] = {"exact": {k: accuracy[k] for k in ("rate", "ci95", "correct")},
                           "right_tool": accuracy["right_tool"], "any_call": accuracy["any_call"]}
    return cells


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
        before, after = (asr_text(cells[w], with_n=True) for w in ("before", "after"))
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


# ---------------------------------------------------------------- the `demo` subcommand


def register(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="train the embedded default and compare it with the original")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo, with --agent runs/demo-agent)")
    demo.add_argument("--config", default=None, help="recipe for the demo's training (default smollm2-135m)")
    demo.add_argument("--agent", action="store_true",
                      help="the tool-using agent demo instead: teach the embedded default tool calls, circuit-break "
                           "it (recipe smollm2-135m-agent), measure harmful calls and benign call accuracy")
    demo.add_argument("--retrain", action="store_true", help="train again even if OUT/model matches the config")
    demo.add_argument("--no-eval", action="store_true",
                      help="skip the evaluation (attacks, over-refusal, report in OUT/eval): "
                           "training and comparison only")
    demo.add_argument("--judge-agreement", action="store_true",
                      help="also measure the judges against the shipped hand labels (about 45 s on 2 cores)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from .data.builtin import check_training_data
    from .models import check_model

    if args.agent:
        return _run_agent(args)
    config = RRConfig.load(recipe_path(args.config or "smollm2-135m"), args.overrides)
    # Before the model loads and --out is created: a bad model, device or data file fails in a second.
    check_model(config.model, dtype=config.dtype, device=config.device)
    check_training_data(config)
    run_demo(config, args.out or "runs/demo", retrain=args.retrain, evaluate=not args.no_eval,
             judge_agreement=args.judge_agreement)
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from .agent_demo import agent_config, run_agent_demo
    from .data.builtin import check_training_data
    from .config import ConfigError

    for flag, given in (("--config", args.config), ("--no-eval", args.no_eval),
                        ("--judge-agreement", args.judge_agreement)):
        if given:
            raise ConfigError(f"demo --agent takes no {flag}: its recipe is smollm2-135m-agent (key=value overrides "
                              "apply to it) and its evaluation is the eval config `agent`")
    out = Path(args.out or "runs/demo-agent")
    check_training_data(agent_config(out, args.overrides))  # a bad override fails before anything is trained
    run_agent_demo(out, args.overrides, retrain=args.retrain)
    return 0
