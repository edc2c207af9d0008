"""Image-question capability of a vision-language model before and after circuit breaking.

The paper checked MMMU and LLaVA-Wild (method.md 9); locally, the built-in benign image test questions
(colour, count, shape, reading a sign, naming an object, reading a label, left/right; drawn by
multimodal/images.py) stand in. Each model answers greedily with the image in its prompt:

- `agreement`: exact-match rate and token-overlap F1 of the model's answers against the original
  (baseline) model's, as `capability.answer_agreement` computes them for text;
- `accuracy`: share of answers that contain one of the item's accepted short answers as a whole word
  (case-insensitive), with n and the Wilson 95% interval, for each model.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from ..data.schema import Example
from ..generation import generate
from .capability import answer_agreement
from .stats import wilson_interval


def answer_accuracy(outputs: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """{"rate", "ci95", "n", "correct"}: outputs containing one of their accepted answers as a whole word."""
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} outputs but {len(answers)} answer lists")
    hits = [any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", o.lower()) for a in accepted)
            for o, accepted in zip(outputs, answers)]
    correct, n = sum(hits), len(hits)
    return {"rate": correct / n if n else None, "ci95": list(wilson_interval(correct, n)) if n else None,
            "n": n, "correct": correct}


def builtin_image_questions(limit: int | None = None) -> list[tuple[Example, list[str]]]:
    """(example, accepted answers) of the built-in benign image test questions."""
    from ..data.builtin import builtin_multimodal_records

    return [(example, list(record["answers"])) for example, record in builtin_multimodal_records("benign", "test")][:limit]


def image_capability_report(model, processor, baseline=None, *, questions: Sequence[tuple[Example, Sequence[str]]] | None = None,
                            limit: int | None = None, max_new_tokens: int = 32, samples: bool = False) -> dict:
    """Accuracy of `model` (and of `baseline`, the original model with the same processor) on image questions,
    and the agreement of their answers. `questions`: (example with images, accepted answers) pairs (default:
    the built-in benign image test split, the first `limit`). `samples`: add every answer to the report."""
    questions = list(questions) if questions is not None else builtin_image_questions(limit)
    for i, (example, _) in enumerate(questions):
        if not example.images:
            raise ValueError(f"image capability: question {example.id or i} has no image")
    conversations = [example.conversation() for example, _ in questions]
    images = [example.images for example, _ in questions]
    answers = [list(accepted) for _, accepted in questions]
    report: dict[str, Any] = {"max_new_tokens": max_new_tokens, "n": len(questions)}
    outputs: dict[str, list[str]] = {}
    for name, m in [("model", model)] + ([("baseline", baseline)] if baseline is not None else []):
        outputs[name] = generate(m, processor, conversations, images=images, max_new_tokens=max_new_tokens)
        report[name] = {"accuracy": answer_accuracy(outputs[name], answers)}
    if baseline is not None:
        report["agreement"] = answer_agreement(outputs["model"], outputs["baseline"])
        if questions:
            report["accuracy_delta"] = report["model"]["accuracy"]["rate"] - report["baseline"]["accuracy"]["rate"]
    else:
        report["agreement"] = {"skipped": "no baseline model to compare with"}
    if samples:
        report["samples"] = [{"id": example.id, "question": example.request, "answers": accepted,
                              **{name: outs[i] for name, outs in outputs.items()}}
                             for i, (example, accepted) in enumerate(questions)]
    return report
