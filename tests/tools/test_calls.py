"""parse_tool_calls: every format the package reads, what small models get wrong, and garbage."""
import random

import pytest

from circuit_breakers.tools.calls import ToolCall, call_marker_ids, decode_keeping_call_markers, parse_tool_calls

WEATHER = ToolCall("get_weather", {"city": "Paris", "days": 3})

FORMATS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
    "hermes, prose around": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                            '{"city": "Paris", "days": 3}}\n</tool_call>\nDone.',
    "hermes, unterminated": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n',
    "llama31 json": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
    "llama31 python_tag": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
                          '<|eom_id|>',
    "llama31 function tag": '<function=get_weather>{"city": "Paris", "days": 3}</function>',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}, '
               '"id": "a1b2c3d4e"}]',
    "mistral v11": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}',
    "bare object": 'Sure! {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}} Anything else?',
    "bare array": '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
    "fenced json": 'Here you go:\n```json\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n```',
    "openai object": '{"type": "function", "id": "call_1", "function": {"name": "get_weather", '
                     '"arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 3}"}}',
    "openai tool_calls": '{"tool_calls": [{"type": "function", "function": {"name": "get_weather", '
                         '"arguments": {"city": "Paris", "days": 3}}}]}',
    "arguments as a json string": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 3}"}',
    "single quotes": "I'll call it: {'name': 'get_weather', 'arguments': {'city': 'Paris', 'days': 3}}",
    "truncated closing braces": '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3',
    "truncated inside a block": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}\n'
                                '</tool_call>',
}


@pytest.mark.parametrize("text", FORMATS.values(), ids=FORMATS.keys())
def test_every_format_gives_the_call(text):
    assert parse_tool_calls(text) == [WEATHER]


def test_several_calls_in_order():
    hermes = ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
              '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    mistral = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    llama = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    for text in (hermes, mistral, llama):
        assert parse_tool_calls(text) == [ToolCall("a", {"x": 1}), ToolCall("b", {})], text


def test_python_syntax_after_the_python_tag():
    text = '<|python_tag|>brave_search.call(query="weather in Paris; today", count=2)<|eom_id|>'
    assert parse_tool_calls(text) == [ToolCall("brave_search", {"query": "weather in Paris; today", "count": 2})]
    assert parse_tool_calls("<|python_tag|>print(open('x').read())") == []  # positional: code, not a call


def test_json_literals_and_python_literals_both_read():
    assert parse_tool_calls('{"name": "f", "arguments": {"a": true, "b": null, "c": -1.5}}') == [
        ToolCall("f", {"a": True, "b": None, "c": -1.5})]
    assert parse_tool_calls("{'name': 'f', 'arguments': {'a': True, 'b': None, 'msg': \"it's\",}}") == [
        ToolCall("f", {"a": True, "b": None, "msg": "it's"})]


def test_a_name_only_call_counts_inside_a_block_but_not_in_prose():
    assert parse_tool_calls('<tool_call>\n{"name": "get_time"}\n</tool_call>') == [ToolCall("get_time", {})]
    assert parse_tool_calls('The user is {"name": "Bob", "age": 3}.') == []
    assert parse_tool_calls('{"name": "Bob"}') == []


def test_json_outside_tool_call_blocks_is_prose():
    text = ('An example looks like {"name": "x", "arguments": {}}.\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("get_time", {})]


def test_a_string_cut_off_by_the_token_limit():
    text = '<tool_call>\n{"name": "send_email", "arguments": {"to": "a@b.c", "body": "Dear customer, your acc'
    assert parse_tool_calls(text) == []  # by default an unfinished value is no call
    assert parse_tool_calls(text, complete_truncated=True) == [
        ToolCall("send_email", {"to": "a@b.c", "body": "Dear customer, your acc"})]
    # Cut inside a key or right after a colon: nothing to complete.
    assert parse_tool_calls('{"name": "f", "arguments": {"bo', complete_truncated=True) == []
    assert parse_tool_calls('{"name": "f", "arguments": {"body": ', complete_truncated=True) == []


GARBAGE = [
    "", "   ", "I'm sorry, I can't help with that.", "{", "}", "[[[", "{]", '{"name": }', "<tool_call>",
    "<tool_call>\n\n</tool_call>", "<tool_call>{\"name\": 3}</tool_call>", "[TOOL_CALLS]", "<|python_tag|>",
    "<|python_tag|>import os; os.system('ls')", '{"name": "f", "arguments": [1, 2]}', '{"name": "", "arguments": {}}',
    '{"name": "f", "arguments": "not json"}', "```json\n{oops}\n```", "{" * 5000, "[" * 3000 + "]" * 3000,
    "<function=f>garbage</function>", "<|python_tag|>f(**x)", "\x00\x01{'\\", None, 42,
]


@pytest.mark.parametrize("text", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_gives_nothing(text):
    assert parse_tool_calls(text) == []


def test_random_text_never_raises():
    rng = random.Random(0)
    alphabet = '{}[]"\':,\\ abc123<>|_=()\n'
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for complete in (False, True):
            assert isinstance(parse_tool_calls(text, complete_truncated=complete), list)


def test_tool_call_from_dict_normalises_and_rejects():
    assert ToolCall.from_dict({"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}) == \
        ToolCall("f", {"a": 1})
    assert ToolCall.from_dict({"name": "f", "arguments": {"a": 1}}).to_dict() == \
        {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    with pytest.raises(ValueError, match="not a tool call"):
        ToolCall.from_dict({"arguments": {"a": 1}})
    with pytest.raises(ValueError, match="not a tool call"):
        ToolCall.from_dict({"name": "f", "arguments": "oops"})


def test_decoding_keeps_the_special_tokens_that_mark_a_call():
    """Mistral's [TOOL_CALLS] and [ARGS] are special tokens: decode(skip_special_tokens=True) would leave
    `get_weather{...}`. The markers stay, the other special tokens (end of turn) still go."""
    from ..helpers import make_chat_tokenizer

    tokenizer = make_chat_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    ids = tokenizer.encode('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>', add_special_tokens=False)
    assert parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=True)) == []
    text = decode_keeping_call_markers(tokenizer, ids)
    assert text == '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
    assert parse_tool_calls(text) == [ToolCall("get_weather", {"city": "Paris"})]
    markers = call_marker_ids(tokenizer)  # read once by a caller that decodes many times
    assert sorted(markers.values()) == ["[ARGS]", "[TOOL_CALLS]"]
    assert decode_keeping_call_markers(tokenizer, ids, markers) == text
    plain = tokenizer.encode("<tool_call>{}</tool_call> done</s>", add_special_tokens=False)  # no special markers
    assert decode_keeping_call_markers(tokenizer, plain) == tokenizer.decode(plain, skip_special_tokens=True)
