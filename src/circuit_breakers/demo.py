"""`circuit-breakers demo` (what `make demo` runs): circuit-break the embedded default and show it.

1. Train with the recipe (default `smollm2-135m`) on the built-in train split, or reuse OUT/model
   when OUT/config.yaml matches the recipe.
2. Mean cosine between the original and the circuit-broken model's representations at the target
   layers, on the response tokens of the held-out harmful and benign test items.
3. Greedy outputs of both models side by side on held-out harmful and benign prompts, labelled by
   the heuristic judge.
4. Everything to OUT/demo.json.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

from .config import RRConfig, atomic_write_text, read_yaml
from .data import ChatFormatter, tokenize_examples
from .data.builtin import generated_set
from .evaluation.diagnostics import representation_similarity
from .generation import generate
from .judges.heuristic import HeuristicJudge, output_perplexities
from .models import load_model


def _trained_with(out: Path, config: RRConfig) -> bool:
    saved = out / "config.yaml"
    return (out / "model" / "config.json").is_file() and saved.is_file() and read_yaml(saved) == config.to_dict()


def run_demo(config: RRConfig, out_dir: str | Path = "runs/demo", *, retrain: bool = False, n_prompts: int = 8,
             max_new_tokens: int = 64, progress: bool = True) -> dict:
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

    # Representations on the held-out test items (responses written by the original model).
    formatter = ChatFormatter(tokenizer, config.max_length)
    cosines = {}
    for name in ("harmful", "benign", "borderline"):
        items = tokenize_examples(generated_set(name, "test"), formatter)
        similarity = representation_similarity(broken, original, items, tokenizer.pad_token_id, config.target_layers)
        cosines[name] = {
            "mean_cosine": sum(s["cosine"] for s in similarity.values()) / len(similarity),
            "per_layer": similarity,
            "items": len(items),
        }

    # Side-by-side greedy outputs on held-out prompts.
    judge = HeuristicJudge()
    samples = []
    for name, harmful in (("harmful", True), ("benign", False)):
        prompts = generated_set(name, "test")[:n_prompts]
        conversations = [p.conversation() for p in prompts]
        outputs = {}
        for label, model in (("original", original), ("circuit_broken", broken)):
            texts = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=n_prompts)
            ppl = output_perplexities(original, tokenizer, conversations, texts)
            outputs[label] = [(t, judge.judge(t, harmful_prompt=harmful, perplexity=p)) for t, p in zip(texts, ppl)]
        for i, prompt in enumerate(prompts):
            samples.append({"set": name, "request": prompt.request, **{
                label: {"output": outputs[label][i][0], "label": outputs[label][i][1].label,
                        "reason": outputs[label][i][1].reason}
                for label in outputs}})

    summary = _summary(samples)
    result = {
        "model": config.model, "config": config.to_dict(), "reused_training": reused,
        "train_seconds": train_seconds, "total_seconds": round(time.time() - started, 1),
        "max_new_tokens": max_new_tokens, "target_layers": config.target_layers,
        "cosine": cosines, "labels": summary, "samples": samples,
    }
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2) + "\n")
    print(report(result))
    return result


def _summary(samples: list[dict]) -> dict:
    counts: dict = {}
    for s in samples:
        for model in ("original", "circuit_broken"):
            key = f"{s['set']}/{model}"
            counts.setdefault(key, {})
            counts[key][s[model]["label"]] = counts[key].get(s[model]["label"], 0) + 1
    return counts


def report(result: dict) -> str:
    width = 58
    lines = [f"\n== circuit-breakers demo: {result['model']} ==",
             "mean cosine (circuit-broken vs original) at target layers "
             f"{result['target_layers']}, response tokens of held-out test items:"]
    for name, c in result["cosine"].items():
        lines.append(f"  {name:<11} {c['mean_cosine']:+.3f}   ({c['items']} items)")
    lines.append("heuristic-judge labels of greedy outputs on held-out prompts:")
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
    lines.append(f"\ntotal {result['total_seconds']} s (training {result['train_seconds']} s); "
                 f"written to demo.json")
    return "\n".join(lines)
