"""Tool calls parsed out of a model's text, whatever chat format the model writes them in.

`parse_tool_calls(text) -> list[ToolCall]` reads:

- Qwen2.5 / Hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call; the
  last block may be unterminated (the generation stopped inside it);
- Llama 3.1: ``{"name": ..., "parameters": {...}}`` (JSON as the whole turn), optionally after
  ``<|python_tag|>``, several separated by ``;``; ``<|python_tag|>tool.call(query="...")`` (built-in tools,
  Python syntax); ``<function=name>{...}</function>``;
- Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` and ``[TOOL_CALLS]name[ARGS]{...}``;
- OpenAI-style objects ``{"type": "function", "function": {"name", "arguments"}}`` and ``{"tool_calls": [...]}``;
- bare JSON objects and arrays anywhere in the text, fenced ```json blocks included.

Tolerated, because small models emit them: text before and after the call; Python literals (single
quotes, True/False/None) where they parse as one; ``arguments`` given as a JSON string; closing brackets
missing at the end of the text (a generation cut short). `complete_truncated=True` also closes a string
cut off at the end (a generation that hit its token limit inside an argument's value). Garbage gives [],
never an exception.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "call_marker_ids", "decode_keeping_call_markers", "parse_tool_calls"]

NAME_KEYS = ("name", "tool_name", "function")
ARGUMENT_KEYS = ("arguments", "parameters", "args")
MAX_CANDIDATES = 100  # JSON starts tried per text: bounds the time spent on brace-heavy garbage
_OPEN = {"{": "}", "[": "]"}
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FUNCTION_TAG = re.compile(r"<function=([\w.\-]+)>(.*?)(?:</function>|$)", re.DOTALL)
_MISTRAL_ARGS = re.compile(r"([\w.\-]+)\s*\[ARGS\]")
_PYTHON_TAG = "<|python_tag|>"
_END_MARKERS = ("<|eom_id|>", "<|eot_id|>", "</s>", "<|im_end|>")
# What tells the parser a call is there; some tokenizers make them special tokens, which a plain
# decode(skip_special_tokens=True) drops (Mistral's [TOOL_CALLS] and [ARGS], Llama 3.1's <|python_tag|>).
CALL_OPENERS = ("<tool_call>", "[TOOL_CALLS]", _PYTHON_TAG)  # the ones a call starts with
CALL_MARKERS = (*CALL_OPENERS, "[ARGS]", "</tool_call>")


@dataclass(frozen=True)
class ToolCall:
    """A function call: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, call: dict) -> "ToolCall":
        """From ``{"name", "arguments"}`` or the OpenAI/data form ``{"type": "function", "function": {...}}``
        (arguments as an object or a JSON string). A ValueError names what is wrong."""
        parsed = _as_call(call, strict=False) if isinstance(call, dict) else None
        if parsed is None:
            raise ValueError(f"not a tool call: {call!r} (expected {{'name': str, 'arguments': dict}} or "
                             f"{{'type': 'function', 'function': {{'name', 'arguments'}}}})")
        return parsed

    def to_dict(self) -> dict:
        """The normalised form of data.schema: ``{"type": "function", "function": {"name", "arguments"}}``."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_marker_ids(tokenizer) -> dict[int, str]:
    """{token id: text} of the tokenizer's special tokens that mark a tool call (CALL_MARKERS); often {}."""
    return {i: token.content for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
            if token.special and token.content in CALL_MARKERS}


def decode_keeping_call_markers(tokenizer, ids, markers: dict[int, str] | None = None) -> str:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, except that special tokens that mark a tool call
    (CALL_MARKERS) are kept: without them a Mistral `[TOOL_CALLS]name[ARGS]{...}` call decodes to
    `name{...}`, which no parser can read. Tokenizers without such special tokens decode exactly as before.
    `markers`: `call_marker_ids(tokenizer)`, for a caller that decodes many times (read from the tokenizer
    when not given)."""
    markers = call_marker_ids(tokenizer) if markers is None else markers
    ids = [int(i) for i in ids]
    if not markers or not markers.keys() & set(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)
    pieces, segment = [], []
    for i in ids:
        if i in markers:
            pieces += [tokenizer.decode(segment, skip_special_tokens=True), markers[i]]
            segment = []
        else:
            segment.append(i)
    return "".join(pieces) + tokenizer.decode(segment, skip_special_tokens=True)


def parse_tool_calls(text: Any, *, complete_truncated: bool = False) -> list[ToolCall]:
    """Every tool call in `text`, in order; [] when there is none (or `text` is not a string)."""
    if not isinstance(text, str) or not text.strip():
        return []
    blocks = [m.group(1) for m in _TOOL_CALL_BLOCK.finditer(text)]
    if blocks:  # a model that writes <tool_call> blocks: JSON outside them is prose, not a call
        return [c for block in blocks for c in _calls_in(block, complete_truncated, lenient=True)]
    tags = _FUNCTION_TAG.findall(text)
    if tags:
        return [ToolCall(name, args) for name, body in tags
                if (args := _object_after(body, complete_truncated)) is not None]
    if "[TOOL_CALLS]" in text:
        text = text.split("[TOOL_CALLS]", 1)[1]
        if _MISTRAL_ARGS.match(text.lstrip()):
            return _mistral_args_calls(text, complete_truncated)
        return _calls_in(text, complete_truncated, lenient=True)
    if _PYTHON_TAG in text:
        return _python_tag_calls(text.split(_PYTHON_TAG, 1)[1], complete_truncated)
    return _calls_in(text, complete_truncated, lenient=False)


# ---------------------------------------------------------------- the formats with their own syntax


def _mistral_args_calls(text: str, complete_truncated: bool) -> list[ToolCall]:
    """``name[ARGS]{...}`` repeated, each call after a [TOOL_CALLS] marker (Mistral's v11 tokenizer)."""
    calls = []
    for part in text.split("[TOOL_CALLS]"):
        match = _MISTRAL_ARGS.match(part.lstrip())
        args = _object_after(part.lstrip()[match.end():], complete_truncated) if match else None
        if args is not None:
            calls.append(ToolCall(match.group(1), args))
    return calls


def _python_tag_calls(text: str, complete_truncated: bool) -> list[ToolCall]:
    """After <|python_tag|>: JSON calls, or built-in tools in Python syntax (``brave_search.call(query="x")``)."""
    for marker in _END_MARKERS:
        text = text.split(marker, 1)[0]
    calls = _calls_in(text, complete_truncated, lenient=True)
    return calls or _python_syntax_calls(text.strip())


def _python_syntax_calls(text: str) -> list[ToolCall]:
    """``f(a=1)``, ``mod.call(a=1)``, ``[f(a=1), g()]`` and ``f(a=1); g()`` with literal keyword arguments."""
    tree = _python_ast(text, "exec")  # `f(a=1); g()` is two statements
    if tree is None:
        return []
    nodes = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr):
            return []
        value = statement.value
        nodes += value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args or any(kw.arg is None for kw in node.keywords):
            return []  # positional or ** arguments: code, not a call
        name = _dotted(node.func)
        if name is None:
            return []
        if name.endswith(".call"):  # Llama 3.1 built-in tools: `brave_search.call(...)` calls brave_search
            name = name[: -len(".call")]
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords}
        except (ValueError, RecursionError):
            return []
        calls.append(ToolCall(name, args))
    return calls


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


# ---------------------------------------------------------------- JSON (or Python-literal) values in text


def _calls_in(text: str, complete_truncated: bool, *, lenient: bool) -> list[ToolCall]:
    """The calls among the JSON values found in `text`, left to right. `lenient`: the text is known to hold
    calls (a <tool_call> block), so an object with only a name is a call without arguments."""
    calls: list[ToolCall] = []
    start, tried = 0, 0
    while tried < MAX_CANDIDATES:
        start = _next_open(text, start)
        if start < 0:
            break
        tried += 1
        end, value = _value_at(text, start, complete_truncated)
        found = _interpret(value, lenient) if end is not None else []
        if found:
            calls += found
            start = end
        else:
            start += 1  # not a call: one nested inside it may be
    return calls


def _object_after(text: str, complete_truncated: bool) -> dict | None:
    """The arguments object at the start of `text` ({} when there is nothing), None when it does not parse."""
    text = text.lstrip()
    if not text:
        return {}
    value = _value_at(text, 0, complete_truncated)[1] if text.startswith("{") else None
    return value if isinstance(value, dict) else None


def _next_open(text: str, start: int) -> int:
    positions = [p for p in (text.find("{", start), text.find("[", start)) if p >= 0]
    return min(positions) if positions else -1


def _value_at(text: str, start: int, complete_truncated: bool) -> tuple[int | None, Any]:
    """(end, value) of the JSON or Python-literal value whose opening bracket is at `start`; (None, None)
    when it does not parse. Missing closing brackets at the end of the text are added."""
    stack: list[str] = []
    quote = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            # An apostrophe opens a string only where a value or key can start: "don't" in a bare word is prose.
            if ch == '"' or text[i - 1] in "{[,: \t\n":
                quote = ch
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in "}]":
            if ch != stack[-1]:
                return None, None
            stack.pop()
            if not stack:
                value = _loads(text[start:i + 1])
                return (i + 1, value) if value is not None else (None, None)
        i += 1
    # The text ended inside the value: a generation cut short.
    snippet = text[start:].rstrip()
    if quote:
        if not complete_truncated or snippet.endswith("\\"):
            return None, None
        snippet += quote
    value = _loads(snippet + "".join(reversed(stack)))
    return (len(text), value) if value is not None else (None, None)


def _loads(snippet: str) -> Any:
    try:
        return json.loads(snippet)
    except (ValueError, RecursionError):
        pass
    tree = _python_ast(snippet, "eval")  # single quotes, True/False/None, trailing commas: a Python literal
    try:
        return _literal(tree.body) if tree is not None else None
    except (ValueError, RecursionError):
        return None


def _python_ast(text: str, mode: str) -> ast.AST | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for escapes such as "\d" in a string
            return ast.parse(text, mode=mode)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.expr) -> Any:
    """A Python literal that may also spell JSON's true/false/null; ValueError on anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        keys = [_literal(k) for k in node.keys]
        if all(isinstance(k, str) for k in keys):
            return {k: _literal(v) for k, v in zip(keys, node.values)}
    raise ValueError("not a literal")


# ---------------------------------------------------------------- values that are calls


def _interpret(value: Any, lenient: bool) -> list[ToolCall]:
    if isinstance(value, list):
        calls = [_as_call(v, strict=not lenient) for v in value]
        return calls if calls and all(calls) else []  # an array is a list of calls, or it is data
    if isinstance(value, dict):
        if isinstance(value.get("tool_calls"), list):
            return _interpret(value["tool_calls"], lenient=True)
        call = _as_call(value, strict=not lenient)
        return [call] if call else []
    return []


def _as_call(value: Any, *, strict: bool) -> ToolCall | None:
    """A call from a dict, or None. `strict` (bare JSON in prose): a name and arguments, nothing else, so
    that an unrelated object such as {"name": "Bob", "age": 3} is not taken for a call."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # OpenAI: {"type": "function", "id": ..., "function": {...}}
        return _as_call(value["function"], strict=False)
    name_key = next((k for k in NAME_KEYS if isinstance(value.get(k), str)), None)
    if name_key is None or not value[name_key].strip():
        return None
    args_key = next((k for k in ARGUMENT_KEYS if k in value), None)
    if strict and (args_key is None or set(value) - {name_key, args_key, "type", "id"}):
        return None
    arguments = _arguments(value[args_key]) if args_key else {}
    return ToolCall(value[name_key].strip(), arguments) if arguments is not None else None


def _arguments(value: Any) -> dict | None:
    """Arguments as a dict: an object, a JSON (or Python-literal) string of one, or empty/null for none."""
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        value = _loads(value.strip())
    return value if isinstance(value, dict) else None
