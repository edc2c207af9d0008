"""The text that opens a tool call in a model's own chat template (prompts with tools: `generation.chat_prompt`).

An API's ``tool_choice="required"`` (or a named function) forces the assistant turn to be a tool call; with
local weights the same is done by prefilling the turn with the opening of a call as the model's template
writes one. `call_opening` finds that opening by rendering an assistant turn whose call has a sentinel
name and cutting it at the sentinel, so it follows whatever the template does (``<tool_call>\\n{"name": "``
for Qwen2.5/Hermes, ``{"name": "`` for Llama 3.1, ``[TOOL_CALLS] [{"name": "`` for Mistral).
"""

from __future__ import annotations

import re
from typing import Sequence

from ..generation import chat_prompt

__all__ = ["call_opening"]

SENTINEL_NAME = "cb_sentinel_tool"
SENTINEL_ARGUMENT = "cb_sentinel_argument"
# Mistral's templates insist on 9 alphanumeric characters for a call id; the others ignore it.
SENTINEL_CALL_ID = "a1b2c3d4e"
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names (plus dots)


def call_opening(tokenizer, tools: Sequence[dict] | None = None, *, name: str | None = None) -> str:
    """The text that opens a tool call right after the assistant header, in the tokenizer's chat template.

    With `name` (a function forced by name, as an API's ``tool_choice={"type": "function", "function":
    {"name": ...}}``), the opening goes on to that name and up to the first argument's key (e.g.
    ``<tool_call>\\n{"name": "send_email", "arguments": {"``), so the model writes the arguments.
    Raises ValueError when the template renders no tool calls or its assistant turn does not continue its
    generation prompt.
    """
    if name is not None and not _TOOL_NAME.match(name):
        raise ValueError(f"tool name {name!r}: expected 1-64 letters, digits, '_', '-' or '.'")
    tools = list(tools or ()) + [_sentinel_tool()]  # so that templates which check call names find it
    user = [{"role": "user", "content": "Call the tool."}]
    call = {"id": SENTINEL_CALL_ID, "type": "function",
            "function": {"name": SENTINEL_NAME, "arguments": {SENTINEL_ARGUMENT: "x"}}}
    prompt = chat_prompt(tokenizer, user, tools=tools)
    turn = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "", "tool_calls": [call]}],
                                         tools=tools, add_generation_prompt=False, tokenize=False)
    template = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if not turn.startswith(prompt):
        raise ValueError(f"the chat template of {template} renders an assistant turn that does not continue "
                         f"its generation prompt; cannot tell where a tool call opens")
    rendered = turn[len(prompt):]
    if SENTINEL_NAME not in rendered:
        raise ValueError(f"the chat template of {template} renders no tool calls (an assistant turn with "
                         f"tool_calls came out without them): it has no call format to force")
    if name is None:
        return rendered[:rendered.index(SENTINEL_NAME)]
    end = rendered.find(SENTINEL_ARGUMENT)
    if end < rendered.index(SENTINEL_NAME):
        raise ValueError(f"the chat template of {template} renders a call's arguments before its name; "
                         f"cannot force a call by name")
    return rendered[:end].replace(SENTINEL_NAME, name)


def _sentinel_tool() -> dict:
    return {"type": "function", "function": {
        "name": SENTINEL_NAME, "description": "A placeholder.",
        "parameters": {"type": "object", "properties": {SENTINEL_ARGUMENT: {"type": "string"}},
                       "required": [SENTINEL_ARGUMENT]}}}
