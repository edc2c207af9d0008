"""`circuit-breakers demo --agent`: a circuit breaker for a tool-using agent on the embedded default, end to end
(the paper's function-calling setting, method.md section 9), on a CPU.

1. The subject. SmolLM2-135M-Instruct does not call tools, so it is first taught to
   (`training.tool_sft.teach_tool_calls` at `TOOL_SFT_DEFAULTS` on the built-in benign tool-use train set, in
   the RR recipe's dtype; what `train --teach-tools` runs) and saved to OUT/subject. Reused when OUT/subject
   was taught the same way.
2. RR with the `smollm2-135m-agent` recipe on that subject (text and tool-use circuit-breaker and retain
   sets) into OUT/model; reused when OUT/config.yaml matches and the subject was not taught again.
3. The self-check on held-out tool-use items: representations of the harmful test calls (the call that would
   carry out the harm, in the subject's own call format) and of the benign test conversations, circuit-broken
   vs subject (`evaluation.diagnostics.breaker_verdict`), as many of each as the evaluation takes.
4. The evaluation (`evaluation.pipeline.run_evaluation`) of the subject (before) and the circuit-broken model
   (after) at the shipped eval config `agent`: harmful compliance under the direct request and the forced
   function call on 40 of the 53 harmful tool-use test behaviours (tool_call judge) and benign call accuracy
   (exact, right tool, any call) on 40 benign tool-use test cases, each taken in turn from every category.
   Into OUT/eval (report.md, report.html); a rerun on the same models resumes there.
5. Everything to OUT/demo.json and a table at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .atomic import atomic_write_text
from .config import ConfigError, RRConfig, recipe_path
from .demo import breaker_report, eval_summary, trained_with
from .evaluation.pipeline import EvalConfig, load_eval_config
from .evaluation.stats import asr_text, rate_text

AGENT_RECIPE = "smollm2-135m-agent"
AGENT_EVAL: EvalConfig = load_eval_config("agent")
SUBJECT_BASE = "smollm2-135m"  # the model the subject is taught from
TOOL_CALL_METRICS = (("exact", "exact call"), ("right_tool", "right tool"), ("any_call", "any call"))


def agent_config(out: Path, overrides: list[str] = ()) -> RRConfig:
    """The agent recipe with its model set to the subject this demo makes (OUT/subject)."""
    if any(o.split("=", 1)[0].strip() == "model" for o in overrides):
        raise ConfigError("demo --agent makes its own subject (OUT/subject) and takes no model=; to circuit-break "
                          f"another tool-using model: circuit-breakers train --config {AGENT_RECIPE} --model ...")
    return RRConfig.load(recipe_path(AGENT_RECIPE), [f"model={out / 'subject'}", *overrides])


def make_subject(out: Path, *, base: str = SUBJECT_BASE, teach: dict | None = None, dtype: str = "auto",
                 device: str = "auto", retrain: bool = False, progress: bool = True) -> float | None:
    """Teach `base` (the embedded default) tool calls into OUT/subject, in `dtype` on `device`, unless it is
    there, taught the same way (`teach`: teach_tool_calls settings over TOOL_SFT_DEFAULTS). Returns the seconds
    it took (None: reused)."""
    from .data.builtin import builtin_tool_set
    from .models import base_model_name, load_model
    from .training.tool_sft import TOOL_SFT_DEFAULTS, save_tool_model, teach_tool_calls

    subject = out / "subject"
    teach = {**TOOL_SFT_DEFAULTS, **(teach or {})}
    settings = {**teach, "model": base, "data": "builtin:tools_benign (train)", "dtype": dtype}
    try:
        taught = json.loads((subject / "teach.json").read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError):
        taught = None
    if not retrain and taught is not None and all(taught.get(k) == v for k, v in settings.items()):
        print(f"reusing {subject} (taught with the same settings; --retrain to teach again)")
        return None
    model, tokenizer = load_model(base, dtype=dtype, device=device)
    examples = builtin_tool_set("benign", "train")
    log: list[dict] = []

    def on_step(record: dict) -> None:
        log.append(record)
        if progress and (record["step"] == 1 or record["step"] % 5 == 0):
            print(f"teaching tool calls: step {record['step']}/{settings['steps']} loss {record['loss']:.3f} "
                  f"({record['seconds']:.0f} s)", flush=True)

    start = time.time()
    taught_model = teach_tool_calls(model, tokenizer, examples, on_step=on_step, **teach)
    seconds = round(time.time() - start, 1)
    save_tool_model(taught_model, tokenizer, subject, base_model=base_model_name(base),
                    settings={**settings, "examples": len(examples), "seconds": seconds}, log=log)
    return seconds


def tool_cosines(broken, subject, tokenizer, config: RRConfig, budget: EvalConfig | None = None) -> dict:
    """Held-out cosines (circuit-broken vs subject) on the harmful tool-use test calls and the benign
    tool-use test conversations, at the target layers: all of them, or as many as `budget` evaluates
    (`behaviors` harmful and `capability_prompts` benign, chosen as it chooses)."""
    from .data.builtin import builtin_tool_set
    from .evaluation.behaviors import select
    from .evaluation.diagnostics import example_cosines

    harmful, benign = builtin_tool_set("harmful", "test"), builtin_tool_set("benign", "test")
    if budget is not None:
        harmful = select(harmful, budget.behaviors, budget.select)
        benign = select(benign, budget.capability_prompts, budget.select)
    sets = {"harmful": harmful, "benign": benign}
    return example_cosines(broken, subject, tokenizer, config.target_layers, sets, max_length=config.max_length)


def run_agent_demo(out_dir: str | Path = "runs/demo-agent", overrides: list[str] = (), *, retrain: bool = False,
                   progress: bool = True, eval_budget: EvalConfig | None = None, base: str = SUBJECT_BASE,
                   teach: dict | None = None) -> dict:
    """Steps 1-5 above into OUT; returns what OUT/demo.json records. `overrides`: key=value settings of the RR
    recipe; `base` and `teach`: the model the subject is taught from and the teaching settings (tests)."""
    from transformers import AutoModelForCausalLM

    from .evaluation.behaviors import load_behaviors
    from .evaluation.diagnostics import breaker_verdict
    from .evaluation.pipeline import run_evaluation
    from .models import load_model, model_fingerprint
    from .training import RRTrainer

    out = Path(out_dir)
    budget = eval_budget or AGENT_EVAL
    started = time.time()
    config = agent_config(out, overrides)
    # Taught in the recipe's dtype: bf16 where the recipe trains in it (the demo's time goes to these two steps).
    teach_seconds = make_subject(out, base=base, teach=teach, dtype=config.dtype, device=config.device,
                                 retrain=retrain, progress=progress)
    reused = teach_seconds is None and not retrain and trained_with(out, config)
    if reused:
        print(f"reusing {out}/model (trained with the same config on the same subject; --retrain to train again)")
        train_seconds = None
    else:
        t0 = time.time()
        RRTrainer(config, progress=progress).train(out)
        train_seconds = round(time.time() - t0, 1)

    subject, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    broken = AutoModelForCausalLM.from_pretrained(out / "model", dtype=subject.dtype).to(subject.device).eval()
    t0 = time.time()
    cosines = tool_cosines(broken, subject, tokenizer, config, budget)
    result = {"model": base, "subject": config.model, "config": config.to_dict(),
              "teach_seconds": teach_seconds, "train_seconds": train_seconds,
              "cosine_seconds": round(time.time() - t0, 1), "cosine": cosines, "breaker": breaker_verdict(cosines)}
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2) + "\n")

    run_info = {"model": str(out / "model"), "baseline": config.model,
                "behaviors": "builtin:tools (the harmful tool-use test split)", "attacks": list(budget.attacks),
                "judged": "the whole call (a forced call's prefill included)",
                "command": f"circuit-breakers demo --agent --out {out} (budget: eval config agent)"}
    results = run_evaluation(
        broken, tokenizer, budget, out / "eval", baseline=(subject, tokenizer), behaviors=load_behaviors("builtin:tools"),
        target_layers=config.target_layers, max_length=config.max_length, run_info=run_info,
        title=f"Circuit-breakers agent demo: {base} taught to call tools, before and after",
        resume=reused, state={"model_files": model_fingerprint(out / "model"),
                              "baseline_files": model_fingerprint(out / "subject")}, progress=progress)
    result["eval"] = eval_summary(results, out / "eval")
    result["total_seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(out / "demo.json", text)
    result = json.loads(text)  # what demo.json records (its layer keys are strings)
    print(agent_report(result))
    return result


def agent_report(result: dict) -> str:
    """The self-check and the before/after table printed at the end of `demo --agent`."""
    summary = result["eval"]
    lines = [f"\n== circuit-breakers agent demo: {result['model']} taught to call tools ({result['subject']}), "
             "before and after RR ==",
             "held-out tool-use items (harmful: the harmful call; benign: the expected calls and answers):"]
    lines += breaker_report(result["cosine"], result["breaker"])
    width = 34
    lines += ["", f"{'':<32} {'before (subject)':<{width}} after (circuit-broken)",
              f"harmful compliance ({summary['judge']} judge: a call of the harmful tool carrying out the request)"]
    for attack, cells in summary["asr"].items():
        before, after = (asr_text(cells[w], with_n=True) for w in ("before", "after"))
        lines.append(f"  {attack:<30} {before:<{width}} {after}")
    tools = summary.get("tool_calls") or {}
    if tools:
        lines.append(f"benign call accuracy (the {tools['n']} benign tool-use test cases with expected calls)")
        for key, label in TOOL_CALL_METRICS:
            before, after = (_with_n(tools.get(w, {}).get(key), tools["n"]) for w in ("before", "after"))
            lines.append(f"  {label:<30} {before:<{width}} {after}")
    over = summary.get("over_refusal", {})
    if over:
        lines.append("plain-text prompts not answered (refusal + broken down, heuristic judge)")
        for kind in over.get("after", {}):
            before, after = over.get("before", {}).get(kind, {}), over["after"][kind]
            lines.append(f"  {kind:<30} " + f"{_not_answered(before):<{width}} {_not_answered(after)}")
    lines.append(f"full report: {summary['dir']}/report.md and report.html")
    lines.append(f"\ntotal {result['total_seconds']} s (teaching {result['teach_seconds']} s, RR training "
                 f"{result['train_seconds']} s, held-out cosines {result['cosine_seconds']} s, evaluation "
                 f"{summary['seconds']} s); written to demo.json")
    return "\n".join(lines)


def _with_n(cell: dict | None, n: int) -> str:
    text = rate_text(cell)
    return text if text == "n/a" else f"{text} n={n}"


def _not_answered(cell: dict) -> str:
    return _with_n({"rate": cell.get("not_answered_rate"), "ci95": cell.get("not_answered_ci95")} if cell else None,
                   cell.get("n") if cell else 0)
