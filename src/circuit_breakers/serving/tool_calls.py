"""Tool calls in the server: how a request's tools shape its prompt, and how a generated text becomes
OpenAI `tool_calls`, streamed or not.

- The prompt is the model's own chat template rendered with `tools=` (`generation.chat_prompt`); a template
  that renders no tool definitions cannot serve tools (400).
- `tool_choice` "required" or a named function forces a call as the forced-call attack does: the assistant
  turn is prefilled with the opening of a call in the template's format (`tools.call_opening`; with the
  function's name for a named one), and the model writes the rest. The prefill is part of the prompt: the
  probe monitor scores every generated token, the call's tokens included, exactly as it scores any answer.
- The answer holds calls when the generation ended its turn ("stop") and its text (after the prefill)
  parses to calls (`tools.parse_tool_calls`); with "auto", only from where a call opens in the template's
  format (its tag, e.g. ``<tool_call>``), only calls of the request's tools, and the text before is the
  content. A tripped answer is the refusal and never holds calls; an answer cut by max_tokens is text.
- Streaming (`CallStream`): content is sent as it is generated until a call may be opening; from there the
  text is held back until the generation ends, then each call goes out as one `delta.tool_calls` chunk
  (index, id, type, name and the whole arguments), or the held text as content if it held no call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..generation import chat_prompt
from ..tools import ToolCall, call_opening, parse_tool_calls
from ..tools.calls import CALL_OPENERS
from .protocol import ApiError, ChatRequest

_PROBE_TOOL = {"type": "function", "function": {"name": "cb_probe_tool_support", "description": "",
                                                "parameters": {"type": "object", "properties": {}}}}
_TAG = re.compile(r"^(<[^<>\s]+>|\[[A-Z_]+\])")  # <tool_call>, [TOOL_CALLS]


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses tools: "none" (no calls parsed), "auto" (a call where one opens) or "forced"."""

    mode: str = "none"
    prefill: str = ""  # forced: the opening of the call, already in the prompt
    # auto: what opens a call: the template's format first, then a call-marking token the tokenizer has
    # (<|python_tag|> before Llama 3.1's JSON)
    markers: tuple[str, ...] = ()
    names: frozenset = frozenset()

    def find(self, text: str, start: int = 0) -> int:
        """Where the first call opens in `text` (from `start`), or -1."""
        found = [i for m in self.markers if (i := text.find(m, start)) >= 0]
        return min(found, default=-1)


def template_renders_tools(tokenizer) -> bool:
    try:
        text = chat_prompt(tokenizer, [{"role": "user", "content": "x"}], tools=[_PROBE_TOOL])
    except Exception:  # noqa: BLE001 - a template that rejects tools has no tool support either
        return False
    return _PROBE_TOOL["function"]["name"] in text


def _no_support(tokenizer, why: str) -> ApiError:
    template = getattr(tokenizer, "name_or_path", None) or "this model"
    return ApiError(f"tools: the chat template of {template} has no tool support ({why}); send the request "
                    "without tools and tool calls", param="tools")


def plan_for(tokenizer, chat: ChatRequest) -> ToolPlan:
    """The request's plan; an ApiError when the model's template cannot render what it asks."""
    if not chat.uses_tools:
        return ToolPlan()
    if not template_renders_tools(tokenizer):
        raise _no_support(tokenizer, "it renders no tool definitions")
    if chat.tool_choice == "none":
        return ToolPlan()
    names = frozenset(t["function"]["name"] for t in chat.tools)
    try:
        if chat.tool_choice in ("required", "function"):
            return ToolPlan("forced", prefill=call_opening(tokenizer, chat.tools, name=chat.tool_name),
                            names=names)
        opening = call_opening(tokenizer, chat.tools).strip()
    except Exception as err:  # noqa: BLE001 - ValueError, or the template's own error on the sentinel call
        raise _no_support(tokenizer, str(err)) from None
    tag = _TAG.match(opening)
    marker = (tag.group(1) if tag else ('{"name"' if opening.startswith("{") else opening)) or '{"name"'
    added = getattr(tokenizer, "get_added_vocab", dict)()
    markers = (marker, *(m for m in CALL_OPENERS if m in added and m != marker))  # a model may open with one
    return ToolPlan("auto", markers=markers, names=names)


def split_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a generation that ended its turn; calls [] when it made none."""
    if plan.mode == "forced":
        calls = parse_tool_calls(plan.prefill + text)
        return (None, calls) if calls else (plan.prefill + text, [])
    if plan.mode == "auto":
        start = plan.find(text)
        if start >= 0:
            calls = parse_tool_calls(text[start:])
            if calls and all(call.name in plan.names for call in calls):
                return text[:start].rstrip() or None, calls
    return text, []


def answer(plan: ToolPlan, text: str, finish_reason: str) -> tuple[str | None, list[ToolCall], str]:
    """(content, calls, finish_reason) of a finished generation (`text`: the refusal when it tripped)."""
    if finish_reason == "stop":
        content, calls = split_calls(plan, text)
        return content, calls, ("tool_calls" if calls else "stop")
    if finish_reason == "length" and plan.mode == "forced":
        return plan.prefill + text, [], finish_reason
    return text, [], finish_reason


def openai_calls(calls: list[ToolCall]) -> list[dict]:
    """OpenAI's `message.tool_calls`: arguments as a JSON string, each call with its own id."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
            for call in calls]


class CallStream:
    """The content of a streamed answer that may hold calls: `feed` each delta, get what may be sent now.

    Content goes out as generated up to where a call may open: a suffix that could begin one of
    `plan.markers` and trailing whitespace are held back (the content before a call is sent right-stripped, as
    `split_calls` gives it). From the marker on (from the start, for a forced call), everything is held until `rest`.
    """

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0
        self.in_call = plan.mode == "forced"

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        start = self.plan.find(self.text, self.sent)
        if start >= 0:
            self.in_call = True
            return self._take(len(self.text[:start].rstrip()))
        hold = max((k for marker in self.plan.markers for k in range(min(len(marker) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(marker[:k])), default=0)
        return self._take(len(self.text[:len(self.text) - hold].rstrip()))

    def rest(self, content: str | None, calls: list[ToolCall]) -> str:
        """At the end, the content not sent yet (`content`, calls: `answer`'s for the whole text)."""
        if calls or content is None:
            return ""
        return content[self.sent:] if content.startswith(self.text[:self.sent]) else content

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
