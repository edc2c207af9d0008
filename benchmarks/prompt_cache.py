"""What the kept prompt caches save an evaluation whose attacks extend one another's prompts, and whether
any output changes: the attacks of an eval config through the harness (`evaluation.harness.evaluate`) on the
same behaviours with `prompt_cache_gb` 0 (every prompt prefilled whole) and the config's value, alternating.

    python benchmarks/prompt_cache.py                                    # tiny random model, seconds
    python benchmarks/prompt_cache.py --model runs/demo-agent/model      # the agent demo's models (eval config
    python benchmarks/prompt_cache.py --model runs/demo-agent/subject    # `agent`: direct, then forced_call)

Prints the seconds of each run, the ratio off / on of their medians, and how many of the outputs differ
(a kept row was computed in another batch, so greedy outputs may differ in the last bits' near-ties).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from circuit_breakers.evaluation.behaviors import load_behaviors, select
from circuit_breakers.evaluation.harness import evaluate, read_samples
from circuit_breakers.evaluation.pipeline import load_eval_config
from circuit_breakers.judges import make_judge
from circuit_breakers.models import load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path or id (default: a tiny random Qwen2 with a tool template)")
    parser.add_argument("--eval-config", default="agent")
    parser.add_argument("--behaviors", default="builtin:tools")
    parser.add_argument("--limit", type=int, help="behaviours (default: the eval config's)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the eval config's")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating")
    args = parser.parse_args(argv)

    config = load_eval_config(args.eval_config)
    if args.max_new_tokens is not None:
        config.max_new_tokens = args.max_new_tokens
    if args.model:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers import make_tiny_model, make_tool_tokenizer

        tokenizer = make_tool_tokenizer("hermes")
        model = make_tiny_model("qwen2", vocab_size=len(tokenizer), layers=2)
        config.max_new_tokens = args.max_new_tokens or 8
    model.eval()
    behaviors = select(load_behaviors(args.behaviors), args.limit or config.behaviors, config.select)
    judge = make_judge(config.judge, config.judge_model)
    variants = {"off": 0.0, "on": config.prompt_cache_gb or 1.0}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, gb in variants.items():
                out = Path(tmp) / f"{name}-{repeat}"
                started = time.perf_counter()
                evaluate(model, tokenizer, behaviors, config.make_attacks(), judge, out, progress=False,
                         prompt_cache_gb=gb, seed=config.seed)
                seconds[name].append(time.perf_counter() - started)
                outputs[name] = [r["output"] for r in read_samples(out / "samples.jsonl")]
                print(f"{name:>3} (prompt_cache_gb {gb}): {seconds[name][-1]:.1f} s", flush=True)
    off, on = (statistics.median(seconds[name]) for name in variants)
    differ = sum(a != b for a, b in zip(outputs["off"], outputs["on"]))
    attacks = ", ".join(config.attacks)
    print(f"\n{len(behaviors)} behaviours x ({attacks}), max_new_tokens {config.max_new_tokens}: "
          f"off {off:.1f} s, on {on:.1f} s, off/on x{off / on:.2f}; outputs differing {differ} of {len(outputs['on'])}")


if __name__ == "__main__":
    main()
