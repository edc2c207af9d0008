"""Did the model make the expected call? An AST match in the style of BFCL (the Berkeley Function-Calling
Leaderboard's "AST accuracy"), on calls parsed from the model's text.

A parsed call matches an expected one when:
- the function name is the same (exact);
- every required parameter is present: the tool definition's ``parameters.required`` when the tool is
  given, otherwise every argument of the expected call;
- every argument's value equals the expected one after normalisation (`values_equal`): JSON types, int
  and float equal when numerically equal (a bool is no number), strings stripped and case-sensitive, lists
  order-sensitive, objects recursively with the same keys;
- an optional parameter is absent or equal to the expected value (or, when the expected call leaves it
  out, to the schema's ``default``); a parameter that is neither expected nor optional fails the match.

An output with several expected calls (BFCL's "parallel") must contain exactly as many calls, matched one
to one in any order; one expected call needs exactly one call in the output.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

from .calls import ToolCall, parse_tool_calls

__all__ = ["call_accuracy", "call_mismatch", "calls_match", "values_equal"]

CallLike = Union[ToolCall, dict]  # a ToolCall, {"name", "arguments"} or {"type": "function", "function": {...}}
Interval = Callable[[int, int], "tuple[float, float]"]  # (successes, n) -> (low, high)
_MISSING = object()


def values_equal(expected: Any, actual: Any) -> bool:
    """Equality of two JSON values after normalisation (see the module docstring)."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    if isinstance(expected, (int, float)):
        return isinstance(actual, (int, float)) and float(expected) == float(actual)
    if isinstance(expected, str):
        return isinstance(actual, str) and expected.strip() == actual.strip()
    if isinstance(expected, (list, tuple)):
        return (isinstance(actual, (list, tuple)) and len(expected) == len(actual)
                and all(values_equal(e, a) for e, a in zip(expected, actual)))
    if isinstance(expected, dict):
        return (isinstance(actual, dict) and set(expected) == set(actual)
                and all(values_equal(v, actual[k]) for k, v in expected.items()))
    return expected is None and actual is None


def call_mismatch(expected: CallLike, actual: CallLike, tools: Sequence[dict] | None = None) -> str | None:
    """Why `actual` does not match `expected` (None when it does). `tools`: the tool definitions of the
    prompt, for which parameters are required or optional and their defaults."""
    expected, actual = _call(expected), _call(actual)
    if actual.name != expected.name:
        return f"called {actual.name!r}, expected {expected.name!r}"
    schema = _parameters_of(tools, expected.name)
    # Without the tool's definition, every expected argument is taken as required.
    required = set(expected.arguments) if schema is None else set(schema.get("required") or ())
    properties = (schema or {}).get("properties") or {}
    for name in sorted(required):
        if name not in actual.arguments:
            return f"missing required argument {name!r}"
    for name, value in actual.arguments.items():
        want = expected.arguments.get(name, _MISSING)
        if want is _MISSING:
            default = (properties.get(name) or {}).get("default", _MISSING)
            if default is _MISSING or not values_equal(default, value):
                return f"unexpected argument {name!r}={value!r}"
        elif not values_equal(want, value):
            return f"argument {name!r}: {value!r}, expected {want!r}"
    return None


def calls_match(expected: CallLike | Sequence[CallLike], parsed: Sequence[ToolCall],
                tools: Sequence[dict] | None = None) -> bool:
    """The parsed calls are exactly the expected ones (one call, or several in any order)."""
    wanted = [_call(w) for w in ([expected] if isinstance(expected, (ToolCall, dict)) else expected)]
    return len(parsed) == len(wanted) and _one_to_one(wanted, list(parsed), tools)


def call_accuracy(expected_calls: Sequence[CallLike | Sequence[CallLike]], outputs: Sequence[str | Sequence[ToolCall]],
                  *, interval: Interval, tools: Sequence[Sequence[dict] | None] | None = None) -> dict:
    """{"rate", "ci95", "n", "correct"} of outputs (model texts, or calls already parsed) that make their
    expected call(s). `interval(successes, n)` gives the 95% interval: the evaluation passes its Wilson
    interval, which lives above this package. `tools`: per output, the tool definitions of its prompt."""
    if len(expected_calls) != len(outputs):
        raise ValueError(f"{len(expected_calls)} expected calls but {len(outputs)} outputs")
    if tools is not None and len(tools) != len(outputs):
        raise ValueError(f"{len(tools)} tool lists but {len(outputs)} outputs")
    per_item = tools if tools is not None else [None] * len(outputs)
    correct = sum(calls_match(want, parse_tool_calls(out) if isinstance(out, str) else out, item_tools)
                  for want, out, item_tools in zip(expected_calls, outputs, per_item))
    n = len(outputs)
    return {"rate": correct / n if n else None, "ci95": list(interval(correct, n)), "n": n, "correct": correct}


def _one_to_one(wanted: list[ToolCall], parsed: list[ToolCall], tools) -> bool:
    """A perfect matching of expected to parsed calls (backtracking: outputs hold a handful of calls)."""
    if not wanted:
        return True
    first, rest = wanted[0], wanted[1:]
    return any(call_mismatch(first, candidate, tools) is None and _one_to_one(rest, parsed[:i] + parsed[i + 1:], tools)
               for i, candidate in enumerate(parsed))


def _call(call: CallLike) -> ToolCall:
    return call if isinstance(call, ToolCall) else ToolCall.from_dict(call)


def _parameters_of(tools: Sequence[dict] | None, name: str) -> dict | None:
    """The JSON schema of `name`'s parameters among the tool definitions; None when it is not there."""
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function, dict) and function.get("name") == name:
            return function.get("parameters") or {}
    return None
