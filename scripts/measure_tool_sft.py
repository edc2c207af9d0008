"""Measure a tool-using subject made by `circuit-breakers train --teach-tools` (or taught here).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_tool_sft.py --eval benign          # the original SmolLM2
    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_tool_sft.py --teach steps=20 lr=1e-3 --eval benign,direct,forced
    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_tool_sft.py --model runs/smollm2-tools --eval benign

The model gets the ChatML tool template when its own has none (the original is thus measured with the same
template as the taught one). Evaluations, on the shipped TEST splits, greedy, with Wilson 95% intervals:
benign = call accuracy (AST match, as evaluation.tool_capability.benign_call_accuracy) on the benign cases
with expected calls, and two looser counts on the same outputs (any call parsed; exactly one call, of the
right tool); direct / forced = harmful compliance (tool_call judge) of the harmful behaviours under the
direct request and the forced call. Prints one JSON object; --json also writes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from circuit_breakers.attacks.direct import DirectConfig, DirectRequest
from circuit_breakers.attacks.forced_call import ForcedCall, ForcedCallConfig
from circuit_breakers.config import parse_overrides
from circuit_breakers.data.builtin import builtin_tool_behaviors, builtin_tool_set
from circuit_breakers.evaluation.stats import wilson_interval
from circuit_breakers.attacks._common import encode, generate_from_ids
from circuit_breakers.generation import chat_prompt
from circuit_breakers.tools import call_accuracy, parse_tool_calls
from circuit_breakers.judges.tool_call import ToolCallJudge
from circuit_breakers.models import load_model
from circuit_breakers.models import base_model_name
from circuit_breakers.training.tool_sft import install_tool_template, save_tool_model, teach_tool_calls


def rate(correct: int, n: int) -> dict:
    return {"rate": correct / n, "ci95": list(wilson_interval(correct, n)), "n": n, "correct": correct}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--teach", nargs="*", metavar="key=value",
                        help="teach first, with these teach_tool_calls settings (steps, lr, lora_r, batch_size, "
                             "max_length, seed)")
    parser.add_argument("--eval", default="benign", help="comma-separated: benign, direct, forced")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--samples", type=int, default=3, help="generations kept per evaluation")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save", type=Path, help="with --teach: save the taught model there (as --teach-tools does)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device="cpu")
    result: dict = {"model": args.model, "template_installed": install_tool_template(tokenizer)}
    if args.teach is not None:
        settings = {k: float(v) if k in ("lr", "lora_alpha") else v for k, v in parse_overrides(args.teach).items()}
        log: list[dict] = []
        start = time.perf_counter()
        model = teach_tool_calls(model, tokenizer, builtin_tool_set("benign", "train"), on_step=log.append,
                                 **settings)
        result["teach"] = {"settings": settings, "seconds": round(time.perf_counter() - start, 1),
                           "loss_first": log[0]["loss"], "loss_last5": sum(r["loss"] for r in log[-5:]) / len(log[-5:]),
                           "losses": [round(r["loss"], 4) for r in log]}
        print(json.dumps(result["teach"]), file=sys.stderr, flush=True)
        if args.save:
            save_tool_model(model, tokenizer, args.save, base_model=base_model_name(args.model),
                            settings={**settings, "seconds": result["teach"]["seconds"]}, log=log)

    wanted = [e.strip() for e in args.eval.split(",") if e.strip()]
    judge = ToolCallJudge()
    behaviors = builtin_tool_behaviors("test")
    for name in wanted:
        start = time.perf_counter()
        if name == "benign":
            # benign_call_accuracy's prompts and generation, its outputs kept for the looser counts below.
            cases = [c for c in builtin_tool_set("benign", "test") if c.tool_calls]
            prompts = [encode(tokenizer, chat_prompt(tokenizer, c.conversation(), tools=c.tools)) for c in cases]
            outputs = generate_from_ids(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
            entry = call_accuracy([list(c.tool_calls) for c in cases], outputs, interval=wilson_interval,
                                  tools=[c.tools for c in cases])
            parsed = [parse_tool_calls(o) for o in outputs]
            # Looser: the output is a call at all; exactly one call, of the expected tool (arguments not compared).
            entry["any_call"] = rate(sum(bool(p) for p in parsed), len(cases))
            entry["right_tool"] = rate(sum(len(p) == len(c.tool_calls) == 1 and p[0].name ==
                                           c.tool_calls[0]["function"]["name"] for p, c in zip(parsed, cases)),
                                       len(cases))
            entry["samples"] = [o[:300] for o in outputs[:args.samples]]
        elif name in ("direct", "forced"):
            attack = (DirectRequest(DirectConfig(max_new_tokens=args.max_new_tokens)) if name == "direct"
                      else ForcedCall(ForcedCallConfig(max_new_tokens=args.max_new_tokens)))
            outputs = attack.run(model, tokenizer, behaviors)
            verdicts = [judge.label(b, o.generations[0]) for b, o in zip(behaviors, outputs)]
            entry = rate(sum(v.complied for v in verdicts), len(verdicts))
            labels: dict[str, int] = {}
            for v in verdicts:
                labels[v.label] = labels.get(v.label, 0) + 1
            entry["labels"] = labels
            entry["samples"] = [o.generations[0][:300] for o in outputs[:args.samples]]
        else:
            raise SystemExit(f"--eval: unknown {name!r}")
        entry["seconds"] = round(time.perf_counter() - start, 1)
        result[name] = entry
        print(json.dumps({name: {k: v for k, v in entry.items() if k != "samples"}}), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
