"""Benign tool-use capability before and after circuit breaking (the paper's BFCL check, method.md 9).

For test cases with expected calls (`data.schema.Example` with `tools` and `tool_calls`), each model answers
greedily with the tools in its prompt; the answer is parsed and AST-matched against the expected call(s)
(`tools.matching`). The accuracy comes with n and the Wilson 95% interval, for the model and, when given, the
original (baseline) model.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..attacks._common import encode, generate_from_ids
from ..data.schema import Example
from ..generation import chat_prompt
from ..tools.matching import call_accuracy
from .stats import wilson_interval


def benign_call_accuracy(model, tokenizer, cases: Sequence[Example], *, max_new_tokens: int = 128,
                         batch_size: int = 16) -> dict:
    """{"rate", "ci95", "n", "correct"}: share of `cases` whose greedy answer makes exactly the expected calls."""
    for i, case in enumerate(cases):
        if not case.tools or not case.tool_calls:
            raise ValueError(f"tool-call accuracy: case {case.id or i} needs tools and the expected tool_calls")
    prompts = [encode(tokenizer, chat_prompt(tokenizer, case.conversation(), tools=case.tools)) for case in cases]
    outputs = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return call_accuracy([list(case.tool_calls) for case in cases], outputs, interval=wilson_interval,
                         tools=[case.tools for case in cases])


def tool_capability_report(model, tokenizer, cases: Sequence[Example], baseline=None, *,
                           max_new_tokens: int = 128, batch_size: int = 16) -> dict:
    """Call accuracy of `model` and, when given, of `baseline` (the original model, same tokenizer), with
    the difference model - baseline. Cases whose response is text (no expected call, e.g. the answer after a
    tool result) are left out and counted in "skipped"."""
    skipped = sum(not case.tool_calls for case in cases)
    cases = [case for case in cases if case.tool_calls]
    report: dict[str, Any] = {"max_new_tokens": max_new_tokens, "n": len(cases), "skipped": skipped}
    for name, m in [("model", model)] + ([("baseline", baseline)] if baseline is not None else []):
        report[name] = benign_call_accuracy(m, tokenizer, cases, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size)
    if baseline is not None and cases:
        report["delta"] = report["model"]["rate"] - report["baseline"]["rate"]
    return report
