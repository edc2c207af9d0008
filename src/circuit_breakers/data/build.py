"""`circuit-breakers data build --model M`: the training and test sets, answered by the model itself.

- harmful (the circuit-breaker set): the model's own compliance; where it refuses, the answer is
  generated again after a prefilled affirmative opener, and the opener is kept in the response.
- benign and borderline (retain sets): the model's own answers.
- refusal (retain set): harmful requests answered by one of the project's refusal styles.

Every prompt set is split into train and test with the fixed seed of `split_examples`, so test
prompts are never trained on. Files are written atomically, with a manifest of what made them.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..atomic import atomic_write_text
from ..generation import generate
from .builtin import PROMPT_SETS, affirmative_starts, builtin_prompts, refusal_texts
from .formatting import refusal_examples
from .loaders import write_jsonl
from .refusal import is_refusal
from .schema import Example


def build_sets(model, tokenizer, out_dir: str | Path, *, model_name: str, max_new_tokens: int = 160,
               batch_size: int = 16, seed: int = 0, limit: int | None = None, progress: bool = True) -> dict:
    """Generate every set for `model` into `out_dir`; returns the manifest written beside them."""
    out = Path(out_dir)
    started = time.time()
    counts: dict[str, int] = {}
    openers = affirmative_starts()
    for name in PROMPT_SETS:
        for split in ("train", "test"):
            prompts = builtin_prompts(name, split)[:limit]
            answers = generate(model, tokenizer, [p.conversation() for p in prompts], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress, desc=f"{name}.{split}")
            examples = [replace(p, response=a.strip(), source=f"builtin/{Path(p.source or name).name}") for p, a in zip(prompts, answers)]
            if name == "harmful":
                examples = _comply(model, tokenizer, examples, openers, max_new_tokens, batch_size, progress)
                counts[f"harmful.{split}.prefilled"] = sum("prefilled" in (e.source or "") for e in examples)
                write_jsonl(out / f"refusal.{split}.jsonl", refusal_examples(prompts, refusal_texts(), seed))
                counts[f"refusal.{split}"] = len(prompts)
            kept = [e for e in examples if e.response]  # an empty answer teaches nothing
            write_jsonl(out / f"{name}.{split}.jsonl", kept)
            counts[f"{name}.{split}"] = len(kept)
    manifest = {"model": model_name, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                "seed": seed, "counts": counts, "seconds": round(time.time() - started, 1),
                # --out is where this manifest lies; the package's data/generated/<model> by default.
                "command": f"circuit-breakers data build --model {model_name}"
                           f" --max-new-tokens {max_new_tokens} --batch-size {batch_size}"
                           + (f" --limit {limit}" if limit else "")}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _comply(model, tokenizer, examples: list[Example], openers: list[str], max_new_tokens: int,
            batch_size: int, progress: bool) -> list[Example]:
    """Replace refusals by a continuation of an affirmative opener (the harmful response we need)."""
    refused = [i for i, e in enumerate(examples) if is_refusal(e.response) or not e.response]
    prefills = [openers[i % len(openers)] for i in refused]
    answers = generate(model, tokenizer, [examples[i].conversation() for i in refused], prefills=prefills,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                       desc="prefilled")
    examples = list(examples)
    for i, opener, answer in zip(refused, prefills, answers):
        examples[i] = replace(examples[i], response=(opener + answer).strip(),
                              source=f"{examples[i].source}:prefilled")
    return examples
