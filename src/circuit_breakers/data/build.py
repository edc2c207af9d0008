"""`circuit-breakers data build --model M`: the training and test sets, answered by the model itself.

- harmful (the circuit-breaker set): the model's own compliance; where it refuses, the answer is
  generated again after a prefilled affirmative opener, and the opener is kept in the response.
- benign and borderline (retain sets): the model's own answers.
- refusal (retain set): harmful requests answered by one of the project's refusal styles.
- for a vision-language model, also the request-only image sets (builtin/multimodal/): harmful and
  typographic, answered (and complied with) as the harmful set is, into `multimodal_harmful.*` and
  `multimodal_typographic.*`, their image paths relative to the file. The benign image set needs no
  generation: its written answers are the retain set (`builtin:multimodal_benign`).

Every prompt set is split into train and test with the fixed seed of `split_examples`, so test
prompts are never trained on. Files are written atomically, with a manifest of what made them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from ..atomic import atomic_write_text
from ..generation import generate
from .builtin import (MULTIMODAL_GENERATED, PROMPT_SETS, affirmative_starts, builtin_multimodal_set, builtin_prompts,
                      refusal_texts)
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
    from ..multimodal.processing import is_processor

    if is_processor(tokenizer):  # a vision-language model answers the image requests too
        counts.update(build_multimodal_sets(model, tokenizer, out, max_new_tokens=max_new_tokens, limit=limit,
                                            progress=progress))
    manifest = {"model": model_name, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                "seed": seed, "counts": counts, "seconds": round(time.time() - started, 1),
                # --out is where this manifest lies; the package's data/generated/<model> by default.
                "command": f"circuit-breakers data build --model {model_name}"
                           f" --max-new-tokens {max_new_tokens} --batch-size {batch_size}"
                           + (f" --limit {limit}" if limit else "")}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_multimodal_sets(model, processor, out_dir: str | Path, *, max_new_tokens: int = 160, limit: int | None = None,
                          progress: bool = True) -> dict[str, int]:
    """The request-only image sets (MULTIMODAL_GENERATED) answered by the vision-language model `model`, refusals
    replaced as for the harmful text set, into OUT/multimodal_<kind>.<split>.jsonl; returns their counts."""
    out = Path(out_dir)
    counts: dict[str, int] = {}
    openers = affirmative_starts()
    for kind in MULTIMODAL_GENERATED:
        for split in ("train", "test"):
            prompts = builtin_multimodal_set(kind, split)[:limit]
            answers = generate(model, processor, [p.conversation() for p in prompts], images=[p.images for p in prompts],
                               max_new_tokens=max_new_tokens, progress=progress, desc=f"multimodal_{kind}.{split}")
            examples = [replace(p, response=a.strip(), source=f"builtin/multimodal/{Path(p.source or kind).name}")
                        for p, a in zip(prompts, answers)]
            examples = _comply(model, processor, examples, openers, max_new_tokens, 1, progress)  # one at a time
            name = f"multimodal_{kind}.{split}"
            kept = [replace(e, images=tuple(_relative(ref, out) for ref in e.images)) for e in examples if e.response]
            write_jsonl(out / f"{name}.jsonl", kept)
            counts[name] = len(kept)
            counts[f"{name}.prefilled"] = sum("prefilled" in (e.source or "") for e in kept)
    return counts


def _relative(image, out: Path):
    """An image path relative to OUT (where the JSONL goes; the loader resolves it from there), so the written
    set moves with the package; raw bytes and paths on another drive stay as they are."""
    if not isinstance(image, str):
        return image
    try:
        return os.path.relpath(image, out.resolve())
    except ValueError:
        return image


def _comply(model, tokenizer, examples: list[Example], openers: list[str], max_new_tokens: int,
            batch_size: int, progress: bool) -> list[Example]:
    """Replace refusals by a continuation of an affirmative opener (the harmful response we need)."""
    refused = [i for i, e in enumerate(examples) if is_refusal(e.response) or not e.response]
    prefills = [openers[i % len(openers)] for i in refused]
    answers = generate(model, tokenizer, [examples[i].conversation() for i in refused], prefills=prefills,
                       images=[examples[i].images for i in refused], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress, desc="prefilled")
    examples = list(examples)
    for i, opener, answer in zip(refused, prefills, answers):
        examples[i] = replace(examples[i], response=(opener + answer).strip(),
                              source=f"{examples[i].source}:prefilled")
    return examples
