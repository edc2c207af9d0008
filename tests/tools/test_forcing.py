"""call_opening: the opening of a tool call, derived from each chat template; chat_prompt with tools."""
import copy

import pytest

from circuit_breakers.tools.calls import ToolCall, parse_tool_calls
from circuit_breakers.generation import chat_prompt
from circuit_breakers.tools.forcing import call_opening
from ..helpers import make_chat_tokenizer, make_tool_tokenizer

EMAIL_TOOL = {"type": "function", "function": {
    "name": "send_email", "description": "Send an email.",
    "parameters": {"type": "object", "required": ["to", "body"],
                   "properties": {"to": {"type": "string"}, "body": {"type": "string"}}}}}
USER = [{"role": "user", "content": "Email Bob."}]

OPENINGS = {  # style: (opening, opening that names send_email)
    "hermes": ('<tool_call>\n{"name": "', '<tool_call>\n{"name": "send_email", "arguments": {"'),
    "llama31": ('{"name": "', '{"name": "send_email", "parameters": {"'),
    "mistral": ('[TOOL_CALLS] [{"name": "', '[TOOL_CALLS] [{"name": "send_email", "arguments": {"'),
}


@pytest.fixture(scope="module", params=sorted(OPENINGS))
def styled(request):
    return request.param, make_tool_tokenizer(request.param)


def test_the_opening_is_read_from_the_template(styled):
    style, tokenizer = styled
    opening, named = OPENINGS[style]
    assert call_opening(tokenizer, [EMAIL_TOOL]) == opening
    assert call_opening(tokenizer, [EMAIL_TOOL], name="send_email") == named
    assert call_opening(tokenizer, None) == opening  # no tools given: the sentinel's definition stands in


def test_an_opening_completed_as_the_template_would_parses_back(styled):
    """prompt + opening + the rest of a call as the template renders it == the template's own turn, and it
    parses to the call: the opening, the template and the parser agree."""
    _, tokenizer = styled
    call = {"type": "function", "function": {"name": "send_email", "arguments": {"to": "bob@x.org", "body": "Hi"}}}
    prompt = chat_prompt(tokenizer, USER, tools=[EMAIL_TOOL])
    turn = tokenizer.apply_chat_template(USER + [{"role": "assistant", "content": "", "tool_calls": [call]}],
                                         tools=[EMAIL_TOOL], tokenize=False)
    opening = call_opening(tokenizer, [EMAIL_TOOL], name="send_email")
    assert turn.startswith(prompt + opening)
    assert parse_tool_calls(turn[len(prompt):]) == [ToolCall("send_email", {"to": "bob@x.org", "body": "Hi"})]


def test_chat_prompt_renders_the_tools_only_when_given(styled):
    _, tokenizer = styled
    with_tools = chat_prompt(tokenizer, USER, "P", [EMAIL_TOOL])
    assert "send_email" in with_tools and with_tools.endswith("P")
    assert "send_email" not in chat_prompt(tokenizer, USER, tools=None)
    assert chat_prompt(tokenizer, USER, tools=()) == tokenizer.apply_chat_template(USER, add_generation_prompt=True,
                                                                             tokenize=False)


def test_a_template_without_tool_calls_is_a_clear_error():
    with pytest.raises(ValueError, match="renders no tool calls"):
        call_opening(make_chat_tokenizer(), [EMAIL_TOOL])


def test_a_turn_that_does_not_continue_the_generation_prompt_is_a_clear_error():
    tokenizer = copy.deepcopy(make_tool_tokenizer("hermes"))
    # The generation prompt opens a thinking block that a rendered assistant turn does not have.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}",
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}")
    with pytest.raises(ValueError, match="does not continue its generation prompt"):
        call_opening(tokenizer, [EMAIL_TOOL])


def test_a_name_that_cannot_be_a_function_name_is_rejected():
    with pytest.raises(ValueError, match="tool name"):
        call_opening(make_tool_tokenizer("hermes"), [EMAIL_TOOL], name='x", "arguments": {}}')
