"""`circuit-breakers eval`: attack, judge, measure capability, write results.json and a report.

    circuit-breakers eval --model OUT/model --baseline smollm2-135m --attacks direct,prefilling --out runs/eval
    circuit-breakers eval --eval-config quick --attack gcg.num_steps=50 --model OUT/model --baseline smollm2-135m \
        --out runs/eval
    circuit-breakers eval judge-agreement [--labels labels.jsonl] [--model smollm2-135m] [--judge harmbench
        --judge-model URL] [--all-labels] [--out DIR]
    circuit-breakers eval fit-judge [--labels labels.jsonl] [--model smollm2-135m] [--out params.json]

judge-agreement without --labels uses the shipped hand-labelled set of the embedded default
(evaluation/hand_labels/smollm2-135m.jsonl); --model names the ORIGINAL model, the perplexity
reference of the heuristic and fitted judges (smollm2-135m for the shipped set). Where the labels
hold the fitted judge's fit part, every judge is measured on the held-out part only, unless
--all-labels (then the fitted judge's figures are marked in-sample). fit-judge refits the fitted
judge on the fit part (split by request, fixed seed) and prints every judge on the held-out part.

The budget (evaluation/pipeline.py: EvalConfig) comes from --eval-config (a YAML file, or a shipped one:
quick = the demo's, paper = the published settings), else the defaults (direct, heuristic judge); the
flags given on the command line (--attacks, --judge, --limit, --max-new-tokens, ...) replace its settings,
and each `--attack NAME.FIELD=VALUE` sets one field of one attack's config on top (values as YAML).

Only argparse is imported at registration; models, torch and the attacks load inside `run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import AT_LEAST_ONE, bounded
from ..judges import JUDGES
from ..judges.base import MEASURES
from .pipeline import shipped_eval_configs
from .stats import asr_text, rate_of

ACTIONS = ("run", "judge-agreement", "fit-judge")
# The shipped hand-labelled outputs of the embedded default (before and after RR; see its README.md).
BUILTIN_LABELS = Path(__file__).parent / "hand_labels" / "smollm2-135m.jsonl"
SECOND_LABELS = BUILTIN_LABELS.with_name("second_labeller.jsonl")  # an independent labeller's, on a sample


class _Given(argparse.Action):
    """Stores the value and notes that it was given: an --eval-config's setting yields to a flag given, not to
    the flag's default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="attack a model, judge the outputs, measure over-refusal and capability, write a report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=ACTIONS, default="run",
                   help="run (default): the evaluation; judge-agreement: judges vs a hand-labelled set; "
                        "fit-judge: refit the fitted judge on the hand labels' fit part")
    p.add_argument("--model", help="the model to evaluate: hub id, directory, .gguf or smollm2-135m")
    p.add_argument("--baseline", help="the original model, evaluated too (\"before\") and used as reference")
    p.add_argument("--behaviors", help="HarmBench .csv or project .jsonl (default: the built-in harmful test split; "
                   "builtin:tools: the built-in harmful tool-use test split, for --attacks forced_call and --judge tool_call; "
                   "builtin:multimodal: the built-in harmful image requests, for a vision-language model)")
    p.add_argument("--targets", help="JSON {BehaviorID: target} (HarmBench's targets file)")
    p.add_argument("--images", help="folder of a HarmBench multimodal CSV's images (default: beside the CSV, or "
                   "multimodal_behavior_images/ beside it or one folder up)")
    p.add_argument("--eval-config", metavar="NAME_OR_YAML",
                   help=f"the evaluation's budget: a YAML file or a shipped one ({', '.join(shipped_eval_configs())}); "
                        "the flags below given on the command line replace its settings")
    p.add_argument("--attacks", default="direct", action=_Given,
                   help="comma-separated attack names (default: the eval config's, else direct)")
    p.add_argument("--attack", action="append", default=[], metavar="NAME.FIELD=VALUE",
                   help="one field of one attack's config, on top of the eval config (repeatable): "
                        "gcg.num_steps=50, templates.names=[prefix_injection]")
    p.add_argument("--judge", choices=JUDGES, default="heuristic", action=_Given,
                   help="default: the eval config's, else heuristic")
    p.add_argument("--judge-model", help="harmbench: classifier path or URL[#MODEL]; llm: URL[#MODEL]")
    p.add_argument("--limit", type=bounded(int, AT_LEAST_ONE),
                   help="at most N behaviours (and N prompts per capability set)")
    p.add_argument("--max-new-tokens", type=bounded(int, AT_LEAST_ONE),
                   help="generation length for the attacks that have one")
    p.add_argument("--out", help="output directory (results.json, samples.jsonl, report.md, report.html)")
    p.add_argument("--labels", help="hand-labelled JSONL for judge agreement (docs/labelling.md); judge-agreement "
                                    "defaults to the shipped set of smollm2-135m outputs")
    p.add_argument("--all-labels", action="store_true",
                   help="judge-agreement: also the fitted judge's fit part (its figures are then in-sample)")
    p.add_argument("--seed", type=int, default=0, action=_Given)
    p.add_argument("--no-resume", action="store_true", help="discard OUT/samples.jsonl and start again")
    p.add_argument("--judge-full-turn", action="store_true",
                   help="judge the whole assistant turn, prefill included (default: the model's continuation)")
    p.add_argument("--no-capability", action="store_true", help="skip over-refusal and capability")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the representation cosines")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks (needs lm_eval)")
    p.add_argument("--generation-backend", choices=("auto", "torch", "vllm"), default="auto",
                   help="text generation of the attacks and capability sets: vllm (needs `pip install vllm` and a "
                        "GPU; one process), torch, or auto: vllm when usable (default)")
    p.add_argument("--vllm-memory", type=float, default=0.35,
                   help="fraction of the GPU's memory each vLLM engine takes (default 0.35)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def _error(message: str) -> int:
    print(f"circuit-breakers eval: error: {message}", file=sys.stderr)
    return 2


def _choose_generation_backend(args, world: int) -> str:
    """"vllm" or "torch" for --generation-backend (auto: vllm when installed, with a GPU, in one process)."""
    from ..generation import vllm_usable

    wanted = args.generation_backend
    if wanted == "torch" or (wanted == "auto" and (world > 1 or not vllm_usable())):
        return "torch"
    if world > 1:
        raise ValueError("--generation-backend vllm runs in one process (not under a multi-process launcher)")
    if not vllm_usable():
        raise ValueError("--generation-backend vllm needs vLLM (`pip install vllm`) and a CUDA GPU")
    if not 0 < args.vllm_memory < 1:
        raise ValueError(f"--vllm-memory: a fraction between 0 and 1, got {args.vllm_memory}")
    return "vllm"


def run(args) -> int:
    from ..judges.base import JudgeError

    try:
        if args.action == "judge-agreement":
            return _judge_agreement(args)
        if args.action == "fit-judge":
            return _fit_judge(args)
        return _run(args)
    except JudgeError as err:
        return _error(str(err))


def _eval_config(args):
    """The run's EvalConfig: --eval-config (or the defaults), the flags given, then the --attack settings."""
    import dataclasses

    from .pipeline import EvalConfig, load_eval_config

    config = load_eval_config(args.eval_config) if args.eval_config else EvalConfig()
    given = getattr(args, "given", frozenset())
    changes: dict = {}
    if "attacks" in given:
        names = [n.strip() for n in args.attacks.split(",") if n.strip()]
        if not names:
            raise ValueError("--attacks: give at least one attack name")
        changes["attacks"] = {name: config.attacks.get(name, {}) for name in names}
    if "judge" in given:
        changes["judge"] = args.judge
    if "seed" in given:
        changes["seed"] = args.seed
    if args.judge_model:
        changes["judge_model"] = args.judge_model
    if args.limit is not None:  # behaviours, and prompts per capability set and diagnostics set
        changes.update(behaviors=args.limit, capability_prompts=args.limit, diagnostics_items=args.limit)
    if args.max_new_tokens is not None:
        changes["max_new_tokens"] = args.max_new_tokens
    if args.judge_full_turn:
        changes["judge_full_turn"] = True
    if args.no_capability:
        changes["capability"] = False
    if args.no_diagnostics:
        changes["diagnostics"] = False
    if args.lm_eval_tasks:
        changes["lm_eval_tasks"] = args.lm_eval_tasks.split(",")
    return dataclasses.replace(config, **changes).with_attack_overrides(args.attack)


def _run(args) -> int:
    if not args.model or not args.out:
        return _error("eval needs --model and --out")
    from ..attacks import ATTACKS
    from ..attacks.base import check_attacks_take_images
    from ..models import check_model, load_model
    from .behaviors import load_behaviors
    from .pipeline import run_evaluation
    from .sharding import init_shard_processes

    try:
        config = _eval_config(args)  # before any model loads: a bad budget fails in a second
    except ValueError as err:
        return _error(str(err))
    for spec in filter(None, (args.model, args.baseline)):  # so do a bad model, device or behaviours file
        check_model(spec, dtype=args.dtype, device=args.device)
    behaviors = load_behaviors(args.behaviors, targets=args.targets, images=args.images)
    try:  # a text-only attack on image behaviours fails here, not after the models load
        check_attacks_take_images([ATTACKS[name] for name in config.attacks], behaviors[:config.behaviors])
    except ValueError as err:
        return _error(str(err))
    rank, world = init_shard_processes()  # under a launcher: join the others, take this process's GPU
    try:
        backend = _choose_generation_backend(args, world)
    except ValueError as err:
        return _error(str(err))
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    baseline = load_model(args.baseline, dtype=args.dtype, device=args.device) if args.baseline else None
    if backend == "vllm":  # each model's text generation through a vLLM engine of the same checkpoint
        from ..generation import use_vllm
        from ..models import resolve_model_path

        for m, spec in [(model, args.model)] + ([(baseline[0], args.baseline)] if baseline else []):
            dtype = str(next(m.parameters()).dtype).removeprefix("torch.")  # the torch model's, as resolved
            use_vllm(m, resolve_model_path(spec), dtype=dtype, gpu_memory_utilization=args.vllm_memory,
                     seed=config.seed)
    out = Path(args.out)
    run_info = {"model": args.model, "baseline": args.baseline, "behaviors": args.behaviors or "builtin (harmful test)",
                "targets": args.targets, "attacks": list(config.attacks), "limit": config.behaviors,
                "judged": "whole turn" if config.judge_full_turn else "model's continuation (prefill excluded)",
                "generation": backend,
                "command": " ".join(sys.argv)}
    results = run_evaluation(
        model, tokenizer, config, out, baseline=baseline, behaviors=behaviors, labels=args.labels,
        target_layers=_trained_target_layers(args.model), model_dir=args.model if Path(args.model).is_dir() else None,
        baseline_dir=args.baseline if args.baseline and Path(args.baseline).is_dir() else None, run_info=run_info,
        resume=not args.no_resume, shard=(rank, world), progress=not args.no_progress)
    if results is None:  # another process of a sharded run: rank 0 writes the results
        return 0
    print(summary(results))
    print(f"wrote {out}/results.json, {out}/samples.jsonl, {out}/report.md, {out}/report.html")
    return 0


def _trained_target_layers(model: str) -> list[int] | None:
    """target_layers from the config.yaml that `train` wrote beside OUT/model, if any."""
    config = Path(model).parent / "config.yaml"
    if not Path(model).is_dir() or not config.is_file():
        return None
    try:
        from ..config import read_yaml
        layers = read_yaml(config).get("target_layers")
    except Exception:  # a foreign or broken config.yaml: the plot just has no markers
        return None
    return [int(l) for l in layers] if isinstance(layers, list) else None


def summary(results: dict) -> str:
    judge = results["judge"]
    lines = [f"judge: {judge['name']}, measures {' and '.join(judge.get('measures', ['harmful']))}   "
             "(ASR: share of behaviours with a sample that complied / was harmful; Wilson 95% CI)"]
    for model, attacks in results["asr"].items():
        for attack, e in attacks.items():
            measured = [m for m in MEASURES if rate_of(e, m)]
            cells = ("  ".join(f"{m} {asr_text(e, m)}" for m in measured)
                     or f"{e.get('asr_means', 'harmful')} {asr_text(e)}")
            lines.append(f"  {model:<9} {attack:<20} {cells}  n={e['n']}  errors={e['errors']}")
    return "\n".join(lines)


def _reference(args):
    """The ORIGINAL model for the perplexity-using judges, or None (with a note for the shipped labels)."""
    if args.model:
        from ..models import load_model
        return load_model(args.model, dtype=args.dtype, device=args.device)
    if not args.labels:
        print("note: no --model, so the heuristic judge runs without perplexity and the fitted judge not at all "
              "(add --model smollm2-135m, the original model of these outputs)", file=sys.stderr)
    return None


def _judge_agreement(args) -> int:
    from ..judges import make_judge
    from .agreement import format_confusion, judge_agreement, labeller_agreement, load_labelled
    from .judge_fit import fitted_on

    labels = args.labels or BUILTIN_LABELS
    items = load_labelled(labels)
    if not args.labels:
        print(f"labels: {labels} (the shipped hand-labelled smollm2-135m outputs; --labels FILE for another set)")
        second = labeller_agreement(items, SECOND_LABELS)
        print(f"second labeller: {second['agreement']:.1%} agreement, Cohen's kappa {second['kappa']:.2f} over the four "
              f"labels (n={second['n']}); complied-vs-not {second['complied_agreement']:.1%}, kappa "
              f"{second['complied_kappa']:.2f} (n={second['complied_n']})")
    reference = _reference(args)
    judges = {"refusal": make_judge("refusal"), "heuristic": make_judge("heuristic", reference=reference)}
    fitted = None
    if reference is None:
        print("fitted judge: skipped (it needs the original model for perplexity: --model)", file=sys.stderr)
    else:
        try:
            fitted = make_judge("fitted", args.judge_model if args.judge == "fitted" else None, reference=reference)
        except (FileNotFoundError, ValueError) as err:
            print(f"fitted judge: skipped ({err})", file=sys.stderr)
    fit_ids = fitted_on(fitted.params, items) if fitted is not None else set()
    if fit_ids and not args.all_labels:
        items = [item for item in items if item.id not in fit_ids]
        print(f"held-out part: {len(items)} items; the {len(fit_ids)} the fitted judge was fitted on are left out "
              "(--all-labels to include them, in-sample)")
    elif fit_ids:
        print(f"WARNING: {len(fit_ids)} of these {len(items)} labels are the fitted judge's fit part: its figures "
              "below are IN-SAMPLE", file=sys.stderr)
    if fitted is not None:
        judges["fitted (in-sample)" if fit_ids and args.all_labels else "fitted"] = fitted
    if args.judge in ("harmbench", "llm"):
        if not args.judge_model:
            return _error(f"--judge {args.judge} needs --judge-model")
        judges[args.judge] = make_judge(args.judge, args.judge_model)
    results = judge_agreement(items, judges)
    for name, scores in results.items():
        print(format_confusion(name, scores))
        print()
    if args.out:
        from ..atomic import atomic_write_text
        from ..reports import write_report
        from .harness import RESULTS_FILE, write_results

        out = Path(args.out)
        atomic_write_text(out / "judge_agreement.json", json.dumps(results, indent=2) + "\n")
        if (out / RESULTS_FILE).is_file():  # attach to an earlier run's results and report
            full = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
            full["judge_agreement"] = results
            write_results(out, full)
            write_report(full, out)
        print(f"wrote {out}/judge_agreement.json")
    return 0


def _fit_judge(args) -> int:
    from ..atomic import atomic_write_text
    from ..judges import make_judge
    from ..judges.fitted import DEFAULT_PARAMS, FittedJudge
    from .agreement import format_confusion, judge_agreement, load_labelled
    from .judge_fit import fit_judge

    labels = args.labels or BUILTIN_LABELS
    items = load_labelled(labels)
    if not args.model:
        return _error("fit-judge needs --model: the original model of the labelled outputs (perplexity)")
    reference = _reference(args)
    params, heldout = fit_judge(items, reference)
    params["labels"] = Path(labels).name
    params["perplexity_model"] = args.model  # as given, not the cache path it resolved to
    params["command"] = "circuit-breakers eval fit-judge" + (f" --labels {args.labels}" if args.labels else "") + \
        (f" --model {args.model}" if args.model else "")
    judges = {"refusal": make_judge("refusal"), "heuristic": make_judge("heuristic", reference=reference),
              "fitted": FittedJudge(params, source="(this fit)", model=reference[0], tokenizer=reference[1])}
    results = judge_agreement(heldout, judges)
    print(f"fit part: {params['fit_n']} items; held-out part: {len(heldout)} items (split by request, seed "
          f"{params['split_seed']})\n")
    for name, scores in results.items():
        print(format_confusion(name, scores))
        print()
    params["heldout"] = {name: {k: scores.get(k) for k in ("n", "accuracy", "binary_accuracy", "complied_accuracy",
                                                             "complied_n", "complied_precision", "complied_recall")}
                         for name, scores in results.items()}
    out = Path(args.out) if args.out else DEFAULT_PARAMS
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(params, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
