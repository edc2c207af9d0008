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
from ..generation import chat_prompt, with_system_prompt
from ..tools.calls import parse_tool_calls
from ..tools.matching import call_accuracy
from .stats import wilson_interval


def benign_call_accuracy(model, tokenizer, cases: Sequence[Example], *, max_new_tokens: int = 128,
                         batch_size: int = 16, system_prompt: str | None = None) -> dict:
    """{"rate", "ci95", "n", "correct"}: share of `cases` whose greedy answer makes exactly the expected calls;
    with the coarser "any_call" (the answer parses to a call) and "right_tool" (the expected functions, by
    name, arguments not compared) as {"rate", "ci95", "correct"}: a small model's exact arguments rarely
    match free text, and these say whether it still calls the right tools."""
    for i, case in enumerate(cases):
        if not case.tools or not case.tool_calls:
            raise ValueError(f"tool-call accuracy: case {case.id or i} needs tools and the expected tool_calls")
    prompts = [encode(tokenizer, chat_prompt(tokenizer, with_system_prompt(case.conversation(), system_prompt),
                                             tools=case.tools)) for case in cases]
    outputs = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    parsed = [parse_tool_calls(output) for output in outputs]
    report = call_accuracy([list(case.tool_calls) for case in cases], parsed, interval=wilson_interval,
                           tools=[case.tools for case in cases])
    expected_names = [sorted(call["function"]["name"] for call in case.tool_calls) for case in cases]
    for key, hits in (("any_call", [bool(calls) for calls in parsed]),
                      ("right_tool", [sorted(c.name for c in calls) == names for calls, names in zip(parsed, expected_names)])):
        correct, n = sum(hits), len(hits)
        report[key] = {"rate": correct / n if n else None, "ci95": list(wilson_interval(correct, n)), "correct": correct}
    return report


def tool_capability_report(model, tokenizer, cases: Sequence[Example], baseline=None, *,
                           max_new_tokens: int = 128, batch_size: int = 16, system_prompt: str | None = None) -> dict:
    """Call accuracy of `model` and, when given, of `baseline` (the original model, same tokenizer), with
    the difference model - baseline. Cases whose response is text (no expected call, e.g. the answer after a
    tool result) are left out and counted in "skipped"."""
    skipped = sum(not case.tool_calls for case in cases)
    cases = [case for case in cases if case.tool_calls]
    report: dict[str, Any] = {"max_new_tokens": max_new_tokens, "n": len(cases), "skipped": skipped}
    for name, m in [("model", model)] + ([("baseline", baseline)] if baseline is not None else []):
        report[name] = benign_call_accuracy(m, tokenizer, cases, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, system_prompt=system_prompt)
    if baseline is not None and cases:
        report["delta"] = report["model"]["rate"] - report["baseline"]["rate"]
    return report
