"""float32 against bfloat16 on a CPU: the two costly parts of `demo --agent`, in one process, interleaved.

    python benchmarks/cpu_dtype.py --subject runs/demo-agent/subject --threads 2

`--subject`: a tool-using model (what `train --teach-tools` or `demo --agent` writes to OUT/subject).
1. RR steps of the `smollm2-135m-agent` recipe on that subject: one trainer per dtype (each on its own copy
   of the weights, same seed, same items at every step), steps interleaved (fp32, bf16, fp32, ...) so that
   machine noise hits both alike. Printed: the median step time of each and the ratio, and the step losses.
2. Greedy generation (the evaluation's `generation.generate`, batch 16) of `--prompts` harmful tool-use test
   requests with their tools, each dtype twice, interleaved. Printed: the time of each, the ratio, and how
   many outputs are the same in both dtypes.

bf16 matrix products are fast only where the CPU has them natively (AVX512-BF16 or AMX on x86, the
BF16 instructions of recent Arm cores); elsewhere PyTorch converts and bf16 can be slower than fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from circuit_breakers.config import RRConfig, recipe_path
from circuit_breakers.data.builtin import builtin_tool_behaviors
from circuit_breakers.generation import generate
from circuit_breakers.models import load_model
from circuit_breakers.training import RRTrainer, batch_indices

DTYPES = ("float32", "bfloat16")


def rr_steps(subject: str, steps: int) -> dict[str, dict]:
    trainers = {dtype: RRTrainer(RRConfig.load(recipe_path("smollm2-135m-agent"),
                                               [f"model={subject}", f"dtype={dtype}"]), progress=False)
                for dtype in DTYPES}
    first = trainers["float32"]
    cb = batch_indices([x.length for x in first.cb_items], first.config.batch_size, first.config.seed)
    retain = batch_indices([x.length for x in first.retain_items], first.config.batch_size, first.config.seed + 1)
    results = {dtype: {"seconds": [], "losses": []} for dtype in DTYPES}
    for step in range(1, steps + 1):
        cb_indices, retain_indices = next(cb), next(retain)
        for dtype, trainer in trainers.items():
            record = trainer.step(step, cb_indices, retain_indices)
            results[dtype]["seconds"].append(record["step_time_s"])
            results[dtype]["losses"].append((record["rerouting_loss"], record["retain_loss"]))
    return results


def generations(subject: str, prompts: int, max_new_tokens: int, repeats: int = 2) -> dict[str, dict]:
    behaviors = builtin_tool_behaviors("test")[:prompts]
    conversations = [[{"role": "user", "content": b.request}] for b in behaviors]
    tools = [list(b.tools) for b in behaviors]
    models = {dtype: load_model(subject, dtype=dtype) for dtype in DTYPES}
    results = {dtype: {"seconds": [], "outputs": None} for dtype in DTYPES}
    for _ in range(repeats):
        for dtype, (model, tokenizer) in models.items():
            start = time.perf_counter()
            outputs = generate(model, tokenizer, conversations, tools=tools, max_new_tokens=max_new_tokens,
                               torch_only=True)
            results[dtype]["seconds"].append(time.perf_counter() - start)
            results[dtype]["outputs"] = outputs
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", required=True, help="a tool-using model directory (OUT/subject of demo --agent)")
    parser.add_argument("--steps", type=int, default=4, help="RR steps per dtype (the first is reported apart)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    steps = rr_steps(args.subject, args.steps)
    print(f"\nRR steps of smollm2-135m-agent (steps 2-{args.steps}; step 1 warms up):")
    print("| dtype | step s median | step 1 s | L_s, L_r at each step |\n|---|---|---|---|")
    median = {}
    for dtype, r in steps.items():
        median[dtype] = statistics.median(r["seconds"][1:])
        losses = "; ".join(f"{s:.4f}, {r_:.5f}" for s, r_ in r["losses"])
        print(f"| {dtype} | {median[dtype]:.2f} | {r['seconds'][0]:.2f} | {losses} |")
    print(f"bf16 / fp32 step time: {median['bfloat16'] / median['float32']:.2f}")

    gens = generations(args.subject, args.prompts, args.max_new_tokens)
    print(f"\nGeneration: {args.prompts} harmful tool-use test prompts, greedy, {args.max_new_tokens} new tokens:")
    print("| dtype | seconds (each repeat) |\n|---|---|")
    for dtype, r in gens.items():
        print(f"| {dtype} | {', '.join(f'{s:.1f}' for s in r['seconds'])} |")
    best = {dtype: min(r["seconds"]) for dtype, r in gens.items()}
    same = sum(a == b for a, b in zip(gens["float32"]["outputs"], gens["bfloat16"]["outputs"]))
    print(f"bf16 / fp32 generation time (best of each): {best['bfloat16'] / best['float32']:.2f}; "
          f"outputs the same in both dtypes: {same} of {args.prompts}")


if __name__ == "__main__":
    main()
