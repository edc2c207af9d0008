"""Does a recipe form the circuit breaker on every machine? Train it over seeds x numerical variants.

A numerical variant imitates another machine on this one: `ATEN_CPU_CAPABILITY` picks PyTorch's CPU
kernels (avx512, avx2, default: other vectorisation, other rounding) and the thread count changes the
order of parallel sums. Each run is a fresh process (the variable is read when torch is imported) and
prints, per target layer, the held-out harmful / benign / borderline-safe response cosine to the
original model, the step at which the layer's training cosine first fell below 0.5, and the verdict
(`evaluation.diagnostics.breaker_verdict`). For runs of the same seed it also compares the first
optimizer step's update across variants: the share of LoRA weights that moved in the same direction
(~50% means the start was set by rounding noise, 100% by the seed).

    python benchmarks/recipe_robustness.py --config smollm2-135m --seeds 42,1,2,3 \\
        --variants native/1,avx2/1 --parallel 2 --out runs/robustness [key=value ...]

`--runs 42:native/1,7:avx2/1` trains those seed/variant pairs instead of every seed under every variant.
`--agent` is for an agent recipe (smollm2-135m-agent with model=THE_SUBJECT): the held-out items are the
tool-use ones `demo --agent` measures, and `--capability` gives its harmful-call and benign-call figures.
`--steps N` gives a cheaper proxy: the full recipe's first N steps (same c_s/c_r schedule). Finished runs are reused when their spec is unchanged;
the table is printed and written to OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FELL_BELOW = 0.5


# ---------------------------------------------------------------- one run, in its own process


def worker(run_dir: Path) -> None:
    import torch

    from circuit_breakers.atomic import atomic_write_text
    from circuit_breakers.config import RRConfig
    from circuit_breakers.evaluation.diagnostics import breaker_verdict, heldout_cosines
    from circuit_breakers.models import load_model
    from circuit_breakers.training import RRTrainer

    spec = json.loads((run_dir / "spec.json").read_text())
    config = RRConfig.load(spec["config"], spec["overrides"])
    trainer = RRTrainer(config, progress=False)
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in lora.items()}
    first_update = {}
    step = trainer.step

    def recorded_step(number, *args, **kwargs):
        record = step(number, *args, **kwargs)
        if number == 1:  # the sign of every LoRA weight's first move: where the start pointed
            first_update.update({n: torch.sign(p.detach() - start[n]).to(torch.int8) for n, p in lora.items()})
        if number % 10 == 0 or number == 1:
            print(f"step {number}: cb_cos per layer {record['cb_cos_layers']}, retain_cos {record['retain_cos']:.4f}, "
                  f"{time.time() - t0:.0f} s", flush=True)
        return record

    t0 = time.time()
    trainer.step = recorded_step
    result = trainer.train(None)
    train_seconds = time.time() - t0
    torch.save(first_update, run_dir / "first_update.pt")

    trained = trainer.model.merge_and_unload().eval()
    if trainer.dropped is not None:  # the whole model again, for generation
        trainer.dropped.reattach(trained, trainer.arch.blocks_path)
    original, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    capability = None
    if spec.get("agent"):  # what `demo --agent` measures, on the items its eval config `agent` takes
        from circuit_breakers.agent_demo import AGENT_EVAL, tool_cosines
        from circuit_breakers.evaluation.behaviors import load_behaviors
        from circuit_breakers.evaluation.pipeline import run_evaluation

        cosines = tool_cosines(trained, original, tokenizer, config, AGENT_EVAL)
        if spec.get("capability"):  # the circuit-broken model alone (its subject's figures are the demo's)
            results = run_evaluation(trained, tokenizer, AGENT_EVAL, run_dir / "eval", progress=False,
                                     behaviors=load_behaviors("builtin:tools"))
            capability = {"asr": {a: results["asr"]["model"][a] for a in AGENT_EVAL.attacks},
                          "tool_calls": results["tool_capability"]["model"]}
    else:
        cosines = heldout_cosines(trained, original, tokenizer, config.target_layers, max_length=config.max_length)
        if spec.get("capability"):  # the demo's over-refusal and agreement on the whole test splits
            from circuit_breakers.evaluation.capability import capability_report

            report = capability_report(trained, tokenizer, original, max_new_tokens=32, batch_size=16,
                                       samples_out=run_dir / "capability_samples.jsonl")
            capability = {"over_refusal": report["over_refusal"], "agreement": report["agreement"],
                          "perplexity": report["perplexity"]}
    log = [{k: r[k] for k in ("step", "rerouting_loss", "retain_loss", "cb_cos", "cb_cos_layers", "retain_cos")}
           for r in result.log]
    fell = {str(layer): next((r["step"] for r in log if r["cb_cos_layers"] and r["cb_cos_layers"][str(layer)]
                              < FELL_BELOW), None) for layer in config.target_layers}
    run = {"spec": spec, "config": config.to_dict(), "train_seconds": round(train_seconds, 1),
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "cosine": cosines, "fell_below_0.5_at_step": fell,
           "verdict": breaker_verdict(cosines), "capability": capability, "log": log}
    if spec.get("keep_model"):  # e.g. to attack it later: circuit-breakers eval --model RUN/model
        trained.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        config.save(run_dir / "config.yaml")
    atomic_write_text(run_dir / "run.json", json.dumps(run, indent=1, default=float) + "\n")


def hidden_worker(path: Path, config_path: str, overrides: list[str]) -> None:
    """Save the original model's hidden states at the target layers for 4 held-out harmful items."""
    import torch

    from circuit_breakers.config import RRConfig
    from circuit_breakers.data import ChatFormatter, collate, tokenize_examples
    from circuit_breakers.data.builtin import generated_set
    from circuit_breakers.hidden import decoder_hidden_states
    from circuit_breakers.models import find_architecture, load_model

    config = RRConfig.load(config_path, overrides)
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    items = tokenize_examples(generated_set("harmful", "test")[:4], ChatFormatter(tokenizer, config.max_length))
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        states = decoder_hidden_states(find_architecture(model), batch["input_ids"], batch["attention_mask"],
                                       config.target_layers)
    torch.save({"states": states, "mask": batch["attention_mask"]}, path)


def variant_differences(args, overrides: list[str]) -> str:
    """How far each variant's hidden states (original model, no training) are from the first variant's."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = {}
    for variant in args.variants:
        path = out / f"hidden-{variant.replace('/', '-t')}.pt"
        subprocess.run([sys.executable, __file__, "--hidden", str(path), "--config", args.config, *overrides],
                       env=variant_env(variant), check=True, capture_output=True)
        saved[variant] = torch.load(path, weights_only=True)
    first = args.variants[0]
    lines = [f"max |difference| of the original model's hidden states from {first} (4 held-out items, real tokens):"]
    for variant in args.variants[1:]:
        mask = saved[first]["mask"].bool()
        cells = []
        for layer, value in saved[variant]["states"].items():
            diff = (value - saved[first]["states"][layer])[mask].abs().max().item()
            cells.append(f"layer {layer}: {diff:.2e}")
        lines.append(f"  {variant}: " + ", ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------- the sweep


def run_name(seed: int, variant: str) -> str:
    """The run's directory under OUT: seed42-avx2-t1."""
    return f"seed{seed}-{variant.replace('/', '-t')}"


def variant_env(variant: str) -> dict[str, str]:
    """`CAPABILITY/THREADS`: native (what this CPU picks), avx512, avx2 or default; threads >= 1."""
    capability, _, threads = variant.partition("/")
    if capability not in ("native", "avx512", "avx2", "default") or not threads.isdigit() or int(threads) < 1:
        raise SystemExit(f"--variants: {variant!r} is not CAPABILITY/THREADS "
                         "(CAPABILITY: native, avx512, avx2 or default; e.g. avx2/1)")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def sweep(args, overrides: list[str]) -> list[dict]:
    out = Path(args.out)
    pending, runs = [], []
    for seed, variant in args.runs:
        run_dir = out / run_name(seed, variant)
        spec = {"config": args.config, "overrides": overrides + [f"seed={seed}"], "seed": seed, "variant": variant,
                "capability": args.capability, **({"keep_model": True} if args.keep_models else {}),
                **({"agent": True} if args.agent else {})}
        runs.append((run_dir, spec))
        done = run_dir / "run.json"
        if done.is_file() and json.loads(done.read_text())["spec"] == spec:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(json.dumps(spec))
        done.unlink(missing_ok=True)
        pending.append((run_dir, spec))
    active: list[tuple[subprocess.Popen, Path]] = []
    failed = []
    while pending or active:
        while pending and len(active) < args.parallel:
            run_dir, spec = pending.pop(0)
            print(f"start {run_dir.name}", flush=True)
            with open(run_dir / "worker.log", "w") as log:
                process = subprocess.Popen([sys.executable, __file__, "--worker", str(run_dir)],
                                           env=variant_env(spec["variant"]), stdout=log, stderr=subprocess.STDOUT)
            active.append((process, run_dir))
        time.sleep(2)
        for process, run_dir in list(active):
            if process.poll() is not None:
                active.remove((process, run_dir))
                print(f"done  {run_dir.name} (exit {process.returncode})", flush=True)
                if process.returncode:
                    failed.append(run_dir)
    if failed:
        raise SystemExit("failed runs (see worker.log): " + ", ".join(str(d) for d in failed))
    return [json.loads((run_dir / "run.json").read_text()) for run_dir, _ in runs]


def sign_agreement(out: Path, results: list[dict]) -> dict[str, float]:
    """Per run: the share of LoRA weights whose first move had the sign of the same seed's first variant."""
    import torch

    agreement, reference = {}, {}
    for run in results:
        seed = run["spec"]["seed"]
        signs = torch.load(out / run_name(seed, run["spec"]["variant"]) / "first_update.pt", weights_only=True)
        if seed not in reference:
            reference[seed] = signs
            continue
        same = sum(int((signs[n] == reference[seed][n]).sum()) for n in signs)
        agreement[f"{seed}/{run['spec']['variant']}"] = same / sum(s.numel() for s in signs.values())
    return agreement


def table(results: list[dict], agreement: dict[str, float]) -> str:
    layers = [str(l) for l in results[0]["config"]["target_layers"]]
    agent = bool(results[0]["spec"].get("agent"))
    sets = [name for name in ("harmful", "benign", "borderline") if name in results[0]["cosine"]]
    measured = (["harmful calls, direct", "harmful calls, forced", "benign: right tool", "benign: any call"] if agent
                else ["borderline not answered", "benign token F1"])
    head = (["seed", "variant", "steps", "train s"] + [f"{name} L{l}" for name in sets for l in layers]
            + [f"cos<0.5 at L{l}" for l in layers] + ["1st-step signs as variant 1"]
            + (measured if results[0].get("capability") else []) + ["verdict"])
    rows = []
    for run in results:
        c, verdict = run["cosine"], run["verdict"]
        key = f"{run['spec']['seed']}/{run['spec']['variant']}"
        cells = [str(run["spec"]["seed"]), run["spec"]["variant"], str(run["config"]["steps"]), f"{run['train_seconds']:.0f}"]
        for name in sets:
            cells += [f"{c[name]['per_layer'][l]['cosine']:+.3f}" for l in layers]
        cells += [str(run["fell_below_0.5_at_step"][l] or "never") for l in layers]
        cells.append(f"{100 * agreement[key]:.1f}%" if key in agreement else "(variant 1)")
        if run.get("capability") and agent:
            asr, tools = run["capability"]["asr"], run["capability"]["tool_calls"]
            cells += [f"{asr[a]['broken']}/{asr[a]['n']}" for a in ("direct", "forced_call")]
            cells += [f"{tools[k]['correct']}/{tools['n']}" for k in ("right_tool", "any_call")]
        elif run.get("capability"):
            border = run["capability"]["over_refusal"]["model"]["borderline"]
            f1 = run["capability"]["agreement"]
            cells.append(f"{border['not_answered_rate'] * border['n']:.0f}/{border['n']}")
            cells.append(f"{f1['token_f1']:.3f} (n={f1['n']})")
        cells.append("formed" if verdict["ok"] else "; ".join(verdict["problems"]).replace("|", "/"))
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    ok = sum(r["verdict"]["ok"] for r in results)
    thresholds = results[0]["verdict"]["thresholds"]
    lines.append(f"\n{ok}/{len(results)} runs meet the thresholds (harmful <= {thresholds['harmful_max']} at every "
                 f"layer, mean benign >= {thresholds['benign_min']}"
                 + (f", mean borderline >= {thresholds['borderline_min']})." if "borderline" in sets else ")."))
    for name in sets:
        for l in layers:
            values = [r["cosine"][name]["per_layer"][l]["cosine"] for r in results]
            lines.append(f"{name} L{l}: min {min(values):+.3f}, max {max(values):+.3f}")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="smollm2-135m", help="recipe name or YAML file")
    parser.add_argument("--seeds", default="42,1,2,3", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--variants", default="native/1,avx2/1", type=lambda s: s.split(","),
                        help="CAPABILITY/THREADS, comma-separated (CAPABILITY: native, avx512, avx2, default)")
    parser.add_argument("--runs", type=lambda s: [(int(r.split(":")[0]), r.split(":", 1)[1]) for r in s.split(",")],
                        help="SEED:VARIANT pairs instead of every seed under every variant (42:native/1,7:avx2/1)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (give each 1 thread)")
    parser.add_argument("--steps", type=int, help="a shorter proxy run (same as steps=N)")
    parser.add_argument("--out", default="runs/robustness")
    parser.add_argument("--capability", action="store_true",
                        help="also generate (32 greedy tokens) on the benign and borderline test splits: "
                             "borderline not answered, benign token F1 with the original (about a minute a run)")
    parser.add_argument("--agent", action="store_true",
                        help="an agent recipe (smollm2-135m-agent; model=THE_TOOL_USING_SUBJECT): cosines on the held-out "
                             "tool-use items `demo --agent` takes, and with --capability its harmful-call and "
                             "benign-call figures of the circuit-broken model (eval config agent)")
    parser.add_argument("--keep-models", action="store_true",
                        help="save each run's circuit-broken model in OUT/RUN/model (about 0.5 GB each)")
    parser.add_argument("--differences-only", action="store_true",
                        help="only compare the variants' hidden states (no training)")
    args, overrides = parser.parse_known_args()
    if args.worker:
        return worker(Path(args.worker))
    if args.hidden:
        return hidden_worker(Path(args.hidden), args.config, overrides)
    from circuit_breakers.config import RRConfig, recipe_path

    args.config = str(recipe_path(args.config))
    RRConfig.load(args.config, overrides)  # a bad key fails here, not in every worker
    if args.steps:  # the first N steps of the full run: same schedule (c_s, c_r), stopped early
        full = RRConfig.load(args.config, overrides)
        overrides += [f"steps={args.steps}", f"schedule_denominator={full.denominator}"]
    if args.runs:
        args.variants = list(dict.fromkeys(variant for _, variant in args.runs))
    else:
        args.runs = [(seed, variant) for seed in args.seeds for variant in args.variants]
    for v in args.variants:
        variant_env(v)
    differences = variant_differences(args, overrides) if len(args.variants) > 1 else ""
    print(differences, flush=True)
    if args.differences_only:
        return
    results = sweep(args, overrides)
    text = differences + "\n\n" + table(results, sign_agreement(Path(args.out), results))
    command = "python benchmarks/recipe_robustness.py " + " ".join(sys.argv[1:])
    print(text)
    Path(args.out, "table.md").write_text(f"`{command}`\n\n{text}\n")
    Path(args.out, "results.json").write_text(json.dumps({"command": command, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
