"""Tool use: the schema's tools and tool calls, rendering through tool-capable chat templates, the public
tool-use layouts and the built-in tool sets."""
import json
import re
from collections import Counter

import pytest

from circuit_breakers.config import ConfigError, RRConfig
from circuit_breakers.data import ChatFormatter, DataError, Example, collate, load_examples, refusal_examples
from circuit_breakers.data.builtin import (builtin_tool_behaviors, builtin_tool_definitions, builtin_tool_set,
                                           load_training_sets)
from circuit_breakers.data.schema import Behavior, example_from_record
from tests.helpers import make_tool_tokenizer

EMAIL_TOOL = {"type": "function", "function": {
    "name": "send_email", "description": "Send an email.",
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
                   "required": ["to", "body"]}}}
WEATHER_BARE = {"name": "get_weather", "description": "Weather for a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"type": "function", "function": {"name": "send_email",
                                         "arguments": {"to": "kim@example.org", "body": "Lunch at noon?"}}}
RECORD = {"request": "Ask Kim about lunch", "tools": [EMAIL_TOOL, WEATHER_BARE], "tool_calls": [CALL],
          "source": "t.jsonl:3"}


@pytest.fixture(scope="module", params=["hermes", "llama31"])
def tool_tokenizer(request):
    return make_tool_tokenizer(request.param)


# ---------------------------------------------------------------- schema

def test_tools_and_calls_are_normalised_and_round_trip():
    string_args = {**RECORD, "tool_calls": [{"name": "send_email",
                                             "arguments": json.dumps(CALL["function"]["arguments"])}]}
    ex = example_from_record(string_args, "x")
    assert ex.response == ""  # a response that is only a call has no text
    assert ex.tool_calls == (CALL,)
    assert ex.tools[1] == {"type": "function", "function": WEATHER_BARE}
    assert ex.assistant_message() == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert example_from_record(json.loads(json.dumps(ex.to_json())), "x") == ex


def test_conversation_with_tool_turns():
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "content": '{"temp_c": 4}', "tool_call_id": "c1", "extra": 1}]
    ex = example_from_record({"messages": messages, "tools": [WEATHER_BARE], "response": "It's 4C."}, "x")
    assistant, tool = ex.messages[1:]
    assert assistant == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert tool == {"role": "tool", "content": '{"temp_c": 4}', "tool_call_id": "c1"}
    assert example_from_record(ex.to_json(), "x") == ex


@pytest.mark.parametrize("change, message", [
    ({"tool_calls": [{"name": "wipe_disk", "arguments": {}}]},
     r'f\.jsonl line 2: field "tool_calls\[0\]\.name": the call names tool \'wipe_disk\', which is not in "tools" '
     r"\(defined: send_email, get_weather\)"),
    ({"tool_calls": [{"name": "send_email", "arguments": "{to: kim}"}]},
     r'field "tool_calls\[0\]\.arguments": expected an object or JSON text of one, got text that is not JSON'),
    ({"tool_calls": [{"name": "send_email", "arguments": "[1, 2]"}]},
     r'field "tool_calls\[0\]\.arguments": expected an object or JSON text of one, got list'),
    ({"tool_calls": [{"type": "function", "function": {"arguments": {}}}]},
     r'field "tool_calls\[0\]\.function\.name": expected a non-empty string, got nothing'),
    ({"tools": [{"description": "no name"}]}, r'field "tools\[0\]\.name": expected a non-empty string'),
    ({"tools": [{"name": "f", "parameters": {"type": "string"}}]},
     r'field "tools\[0\]\.parameters": expected a JSON-schema object'),
    ({"tools": [EMAIL_TOOL, EMAIL_TOOL]}, r"field \"tools\[1\]\.function\.name\": tool 'send_email' is defined twice"),
    ({"tools": "not json"}, r'field "tools": expected a list of tool definitions or JSON text of one'),
    ({"tool_calls": None, "messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "tool_calls": [{"name": "nope"}]}], "response": "ok"},
     r'field "messages\[1\]\.tool_calls\[0\]\.name": the call names tool \'nope\''),
    ({"tool_calls": None}, r'field "response": missing'),  # without calls the response text is required again
])
def test_schema_errors_name_the_field(change, message):
    with pytest.raises(DataError, match=message):
        example_from_record({**RECORD, **change}, "f.jsonl line 2")


def test_behavior_harmful_call_is_checked_against_its_tools():
    tools = example_from_record(RECORD, "x").tools
    ok = Behavior(id="b1", request="r", tools=tools, harmful_call={"name": "send_email", "key_argument": "body"})
    assert ok.harmful_call["key_argument"] == "body"
    with pytest.raises(DataError, match=r"behavior b1: field \"harmful_call.key_argument\": 'subject' is not a "
                                        r"parameter of send_email \(to, body\)"):
        Behavior(id="b1", request="r", tools=tools, harmful_call={"name": "send_email", "key_argument": "subject"})
    with pytest.raises(DataError, match=r"field \"harmful_call\": expected"):
        Behavior(id="b1", request="r", harmful_call={"name": "send_email"})


# ---------------------------------------------------------------- formatting

def split_text(tokenizer, item):
    ids = list(item.input_ids)
    return tokenizer.decode(ids[:item.response_start]), tokenizer.decode(ids[item.response_start:])


def test_call_is_the_masked_response_and_tools_are_in_the_prompt(tool_tokenizer):
    item = ChatFormatter(tool_tokenizer, 4096).format(example_from_record(RECORD, "x"))
    prompt, response = split_text(tool_tokenizer, item)
    assert "send_email" in prompt and "Weather for a city." in prompt and "Ask Kim about lunch" in prompt
    assert "Lunch at noon?" not in prompt
    assert re.search(r'"name": "send_email", "(arguments|parameters)": \{"to": "kim@example.org", '
                     r'"body": "Lunch at noon\?"\}', response)
    assert response.endswith(("<|im_end|>\n", "<|eot_id|>"))  # the turn's end is rerouted/retained too
    # Exactly the call's turn is under the response mask.
    batch = collate([item], pad_token_id=0)
    masked = batch["input_ids"][0][batch["response_mask"][0]].tolist()
    assert tool_tokenizer.decode(masked) == response and masked == list(item.input_ids[item.response_start:])


def test_history_calls_and_results_stay_in_the_prompt(tool_tokenizer):
    ex = builtin_tool_set("benign", "test")
    multi = next(e for e in ex if e.messages)
    prompt, response = split_text(tool_tokenizer, ChatFormatter(tool_tokenizer, 4096).format(multi))
    call = multi.messages[1]["tool_calls"][0]["function"]
    assert call["name"] in prompt and multi.messages[2]["content"] in prompt
    assert response.startswith(multi.response)


def test_template_without_tool_support_is_an_error_unless_json_is_asked_for(chat_tokenizer):
    example = example_from_record(RECORD, "x")
    with pytest.raises(DataError, match=r"t\.jsonl:3: field \"tools\": the chat template of 'tiny-chatml-test' has no "
                                        r"tool support: it renders the same prompt with tools as without\. Set "
                                        r"tool_format: json"):
        ChatFormatter(chat_tokenizer, 1024).format(example)
    item = ChatFormatter(chat_tokenizer, 1024, tool_format="json").format(example)
    prompt, response = split_text(chat_tokenizer, item)
    assert '"name": "send_email"' in prompt and "Ask Kim about lunch" in prompt
    assert response == ('{"name": "send_email", "arguments": {"to": "kim@example.org", "body": "Lunch at noon?"}}'
                        "<|im_end|>\n")
    # Examples without tools are unaffected by tool_format.
    plain = Example(response="Hi", request="Hello")
    assert ChatFormatter(chat_tokenizer, 64, tool_format="json").format(plain) == \
        ChatFormatter(chat_tokenizer, 64).format(plain)


def test_template_that_drops_calls_is_detected(chat_tokenizer):
    # Lists tools in the prompt but never writes an assistant's tool_calls.
    forgetful = ("{% if tools %}{{ 'TOOLS: ' + (tools | tojson) + '\n' }}{% endif %}"
                 "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] or '') + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(DataError, match="does not write a tool call's name in the assistant turn"):
        ChatFormatter(chat_tokenizer, 1024, chat_template=forgetful).format(example_from_record(RECORD, "x"))


def test_tool_format_is_validated():
    with pytest.raises(ValueError, match='tool_format must be "template" or "json"'):
        ChatFormatter(make_tool_tokenizer(), 64, tool_format="xml")
    with pytest.raises(ConfigError, match="tool_format: expected one of template, json, got 'xml'"):
        RRConfig(tool_format="xml")
    assert RRConfig().tool_format == "template"


def test_refusals_keep_the_tools():
    (refusal,) = refusal_examples([example_from_record(RECORD, "x")], ["No."], seed=0)
    assert refusal.tools == example_from_record(RECORD, "x").tools and refusal.tool_calls is None


# ---------------------------------------------------------------- public layouts

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_openai_chat_layout(tmp_path):
    record = {"tools": [WEATHER_BARE], "messages": [
        {"role": "system", "content": "You are a travel assistant."},
        {"role": "user", "content": "Is it cold in Tromso?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tromso"}'}}]}]}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    ex, hello = load_examples(write_jsonl(tmp_path / "openai.jsonl", [record, plain]))
    assert [m["role"] for m in ex.messages] == ["system", "user"] and ex.response == ""
    assert ex.tool_calls == ({"type": "function", "id": "call_1",
                              "function": {"name": "get_weather", "arguments": {"city": "Tromso"}}},)
    assert (hello.messages, hello.response) == (({"role": "user", "content": "Hi"},), "Hello!")


GLAIVE_SYSTEM = ("SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
                 '{\n    "name": "find_recipe",\n    "description": "Find a recipe by ingredient",\n'
                 '    "parameters": {\n        "type": "object",\n        "properties": {\n'
                 '            "ingredient": {"type": "string"}\n        },\n        "required": ["ingredient"]\n    }\n}\n\n'
                 '{"name": "set_timer", "description": "Start a kitchen timer", "parameters": {"type": "object", '
                 '"properties": {"minutes": {"type": "integer"}}}}\n')
GLAIVE_CHAT = ("USER: I have leeks. What's a recipe, I'm making dinner?\n\n\n"
               "ASSISTANT: <functioncall> {\"name\": \"find_recipe\", \"arguments\": '{\"ingredient\": \"leek's\"}'} "
               "<|endoftext|>\n\n\n"
               "FUNCTION RESPONSE: {\"recipe\": \"Leek and potato soup\"}\n\n\n"
               "ASSISTANT: Try a leek and potato soup. <|endoftext|>\n\n\n")


def test_glaive_layout(tmp_path):
    no_functions = {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.",
                    "chat": "USER: Say hi.\n\n\nASSISTANT: Hi there! <|endoftext|>\n"}
    path = write_jsonl(tmp_path / "glaive.jsonl", [{"system": GLAIVE_SYSTEM, "chat": GLAIVE_CHAT}, no_functions])
    ex, chat = load_examples(path)
    assert [t["function"]["name"] for t in ex.tools] == ["find_recipe", "set_timer"]
    assert ex.messages == ({"role": "user", "content": "I have leeks. What's a recipe, I'm making dinner?"},)
    # The response is the first calling turn; single-quoted arguments (with an apostrophe inside) are parsed.
    assert ex.tool_calls[0]["function"] == {"name": "find_recipe", "arguments": {"ingredient": "leek's"}}
    assert chat.tools is None and chat.response == "Hi there!"
    assert chat.messages[0] == {"role": "system", "content": "You are a helpful assistant, with no access to "
                                                             "external functions."}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"system": GLAIVE_SYSTEM,
                                                "chat": "USER: x\n\n\nASSISTANT: <functioncall> {name: f}"}])
    with pytest.raises(DataError, match=r'bad\.jsonl line 1: field "chat": a <functioncall> is not JSON'):
        load_examples(bad)


def test_xlam_layout(tmp_path):
    tools = [{"name": "convert_units", "description": "Convert a quantity.",
              "parameters": {"value": {"description": "Amount", "type": "float"},
                             "unit": {"description": "Target unit", "type": "str, optional", "default": "kg"}}}]
    answers = [{"name": "convert_units", "arguments": {"value": 12.5, "unit": "lb"}}]
    path = write_jsonl(tmp_path / "xlam.jsonl", [{"id": 7, "query": "How many pounds is 12.5 kg?",
                                                 "tools": json.dumps(tools), "answers": json.dumps(answers)}])
    (ex,) = load_examples(path)
    assert (ex.id, ex.request, ex.response) == ("7", "How many pounds is 12.5 kg?", "")
    parameters = ex.tools[0]["function"]["parameters"]
    assert parameters["required"] == ["value"]
    assert parameters["properties"]["value"] == {"type": "number", "description": "Amount"}
    assert parameters["properties"]["unit"]["type"] == "string"
    assert ex.tool_calls[0]["function"]["arguments"] == {"value": 12.5, "unit": "lb"}
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"query": "q", "tools": json.dumps(tools),
                                                 "answers": json.dumps([{"name": "rm_rf", "arguments": {}}])}])
    with pytest.raises(DataError, match=r"u\.jsonl line 1: field \"tool_calls\[0\]\.name\": the call names tool 'rm_rf'"):
        load_examples(unknown)


# ---------------------------------------------------------------- built-in sets

CATEGORIES = {"cybercrime", "fraud_scams", "harassment", "disinformation", "privacy_violation", "physical_harm"}


def request_of(example):
    return example.request or example.messages[0]["content"]


def test_builtin_tool_sets_sizes_and_categories():
    assert len(builtin_tool_definitions()) >= 40
    harmful = {split: builtin_tool_set("harmful", split) for split in ("train", "test")}
    benign = {split: builtin_tool_set("benign", split) for split in ("train", "test")}
    assert len(harmful["train"]) >= 150 and len(harmful["test"]) >= 40
    assert len(benign["train"]) >= 300 and len(benign["test"]) >= 60
    counts = Counter(e.category for e in harmful["train"])
    assert set(counts) == CATEGORIES and min(counts.values()) >= 15, counts
    assert set(Counter(e.category for e in harmful["test"])) == CATEGORIES
    for example in harmful["train"] + harmful["test"]:
        assert example.response == "" and len(example.tool_calls) == 1 and len(example.tools) >= 2
    assert sum(bool(e.messages) for e in benign["train"]) >= 30  # some continue past the tool's result


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize("kind", ["harmful", "benign"])
def test_no_test_request_is_a_train_request_or_a_variant_of_one(kind):
    train = [words(request_of(e)) for e in builtin_tool_set(kind, "train")]
    for example in builtin_tool_set(kind, "test"):
        test = words(request_of(example))
        # A template variant with a name or number changed shares nearly all its words.
        closest = max(len(test & t) / len(test | t) for t in train)
        assert closest < 0.5, (example.id, closest)


def test_harmful_behaviors_carry_tools_and_the_harmful_call():
    behaviors = builtin_tool_behaviors("test")
    examples = builtin_tool_set("harmful", "test")
    assert len(behaviors) == len(examples)
    for behavior, example in zip(behaviors, examples):
        call = example.tool_calls[0]["function"]
        assert behavior.harmful_call["name"] == call["name"]
        assert behavior.harmful_call["key_argument"] in call["arguments"]
        assert behavior.tools == example.tools and behavior.request == example.request
        assert behavior.category in CATEGORIES and behavior.target


def test_tool_data_specs_and_their_refusals():
    cb, retain = load_training_sets(["builtin:tools_harmful"], ["builtin:tools_benign"], seed=0)
    assert len(cb) == len(builtin_tool_set("harmful", "train"))
    refusals = [e for e in retain if e.category == "refusal"]
    assert len(refusals) == len(cb) and len(retain) == len(builtin_tool_set("benign", "train")) + len(cb)
    assert all(r.tools and not r.tool_calls for r in refusals)
    with pytest.raises(DataError, match=r"builtin:tools_harmful, builtin:tools_benign"):
        load_training_sets(["builtin:tools_harmfull"], ["builtin"], seed=0)


def test_builtin_test_sets_render_with_both_templates(tool_tokenizer):
    formatter = ChatFormatter(tool_tokenizer, 4096, truncation="error")
    for example in builtin_tool_set("harmful", "test") + builtin_tool_set("benign", "test"):
        prompt, response = split_text(tool_tokenizer, formatter.format(example))
        for call in example.tool_calls or ():
            assert call["function"]["name"] in response
        assert all(t["function"]["name"] in prompt for t in example.tools)
