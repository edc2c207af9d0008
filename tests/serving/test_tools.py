"""Tools through the server: `tools` and `tool_choice` in, OpenAI `tool_calls` out, streamed and not.

A tiny Qwen2 with the Hermes-style tool template (`make_tool_tokenizer("hermes")`). A random model never
writes a call by itself, so the `scripted` fixture makes generation pick the tokens of a fixed text
(then end its turn) whatever the logits; the tokens still go through the model (and the probe's hook)
as any generated token does.
"""
import json

import pytest

from circuit_breakers.generation import chat_prompt

from ..helpers import (MODEL, LiveServer, app_maker, assert_error, chat, make_tiny_model, make_tool_tokenizer,
                       parse_sse, probe_for, streamed_text, threshold_tripping_at)

openai = pytest.importorskip("openai")

REFUSAL = "I won't help with that."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
EMAIL = {"type": "function", "function": {
    "name": "send_email", "description": "Send an email.",
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}}}}
TOOLS = [WEATHER, EMAIL]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
REQUIRED_REST = CALL[len('<tool_call>\n{"name": "'):]  # what the model writes after the forced opening
NAMED_REST = CALL[len('<tool_call>\n{"name": "get_weather", "arguments": {"'):]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tool_tokenizer():
    return make_tool_tokenizer("hermes")


@pytest.fixture(scope="module")
def tool_model(tool_tokenizer):
    model = make_tiny_model("qwen2", vocab_size=len(tool_tokenizer), layers=4, seed=0)
    model.config.max_position_embeddings = 2048  # a prompt with tools is longer than the tiny default of 256
    return model


@pytest.fixture
def scripted(monkeypatch, tool_tokenizer):
    """Set `script["text"]`: every generation then writes that text and ends its turn."""
    from circuit_breakers.serving import engine

    script = {"text": ""}
    seen = {}  # id(request) -> (request, tokens picked); the request is kept so that its id is not reused

    def pick(logits, request, generator):
        ids = tool_tokenizer(script["text"], add_special_tokens=False).input_ids + [tool_tokenizer.eos_token_id]
        _, n = seen.get(id(request), (request, 0))
        seen[id(request)] = (request, n + 1)
        return ids[min(n, len(ids) - 1)]

    monkeypatch.setattr(engine, "_pick", pick)
    return script


@pytest.fixture
def make_tool_app(tool_model, tool_tokenizer):
    return app_maker(tool_model, tool_tokenizer)


@pytest.fixture
def tool_client(make_tool_app):
    from fastapi.testclient import TestClient

    with TestClient(make_tool_app()) as c:
        yield c


def prompt_tokens(tokenizer, messages, tools=TOOLS, prefill=""):
    return len(tokenizer(chat_prompt(tokenizer, messages, prefill=prefill, tools=tools),
                         add_special_tokens=False).input_ids)


def test_openai_client_round_trip(make_tool_app, tool_tokenizer, scripted):
    with LiveServer(make_tool_app()) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)

        scripted["text"] = NAMED_REST
        completion = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED,
                                                    max_tokens=100)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        opening = '<tool_call>\n{"name": "get_weather", "arguments": {"'
        assert completion.usage.prompt_tokens == prompt_tokens(tool_tokenizer, USER, prefill=opening)

        scripted["text"] = REQUIRED_REST
        chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                                     tool_choice="required", max_tokens=100, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed = [tc for d in deltas for tc in d.tool_calls or ()]
        assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].id.startswith("call_")
        assert streamed[0].function.name == "get_weather"
        assert json.loads(streamed[0].function.arguments) == {"city": "Paris"}
        assert not "".join(d.content or "" for d in deltas)  # the call's text is not sent as content
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # The call and its result go back in the conversation; the model answers in text.
        scripted["text"] = "It is 21 degrees in Paris."
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
        history = USER + [choice.message.model_dump(exclude_none=True), result]
        final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=100)
        assert final.choices[0].message.content == "It is 21 degrees in Paris."
        assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
        rendered = USER + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": '{"temperature": 21}'}]
        text = chat_prompt(tool_tokenizer, rendered, tools=TOOLS)
        assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in text
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
        assert final.usage.prompt_tokens == prompt_tokens(tool_tokenizer, rendered)


def test_auto_call_after_text(tool_client, scripted):
    scripted["text"] = "Let me check.\n" + CALL
    body = chat(tool_client, USER, tools=TOOLS, max_tokens=100).json()
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]

    events, done = parse_sse(chat(tool_client, USER, tools=TOOLS, max_tokens=100, stream=True).text)
    assert done and streamed_text(events) == "Let me check."
    calls = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["index"], c["type"], c["function"]["name"]) for c in calls] == [(0, "function", "get_weather")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_without_a_call_and_calls_that_are_not_answers(tool_client, scripted):
    scripted["text"] = "Paris is sunny."  # auto, no call: plain text, streamed whole
    body = chat(tool_client, USER, tools=TOOLS, max_tokens=100).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris is sunny."}
    events, _ = parse_sse(chat(tool_client, USER, tools=TOOLS, max_tokens=100, stream=True).text)
    assert streamed_text(events) == "Paris is sunny." and events[-1]["choices"][0]["finish_reason"] == "stop"

    scripted["text"] = CALL  # tool_choice "none": the text is content
    body = chat(tool_client, USER, tools=TOOLS, tool_choice="none", max_tokens=100).json()
    assert body["choices"][0]["message"]["content"] == CALL and body["choices"][0]["finish_reason"] == "stop"

    scripted["text"] = CALL.replace("get_weather", "launch_rockets")  # auto: a tool the request did not offer
    body = chat(tool_client, USER, tools=TOOLS, max_tokens=100).json()
    assert "tool_calls" not in body["choices"][0]["message"]

    scripted["text"] = REQUIRED_REST  # cut short by max_tokens: text, not a half call
    body = chat(tool_client, USER, tools=TOOLS, tool_choice="required", max_tokens=5).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith('<tool_call>\n{"name": "')


@pytest.mark.parametrize("tools, param", [
    ("get_weather", "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "retrieval"}], "tools[0].type"),
    ([{"function": {"name": "f"}}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([WEATHER, 3], "tools[1]"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "description": 5}}], "tools[0].function.description"),
])
def test_malformed_tools(tool_client, tools, param):
    error = assert_error(chat(tool_client, USER, tools=tools), param=param)
    assert error["message"].startswith(param)


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": NAMED | {"function": {"name": "launch_rockets"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": NAMED, "tools": None}, "tool_choice"),
    ({"tool_choice": "required", "tools": []}, "tool_choice"),
    ({"messages": USER + [{"role": "tool", "content": "21"}]}, "messages[1].tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": "x"}]}, "messages[1].tool_calls"),
])
def test_bad_tool_choice_and_tool_messages(tool_client, extra, param):
    body = {"tools": TOOLS, **extra}
    error = assert_error(chat(tool_client, body.pop("messages", USER), **body), param=param)
    if extra.get("tool_choice") and isinstance(extra["tool_choice"], dict) and "function" in extra["tool_choice"]:
        assert "launch_rockets" in error["message"] or "not among tools" in error["message"]


def test_unknown_function_with_the_openai_client(make_tool_app):
    with LiveServer(make_tool_app()) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice={
                "type": "function", "function": {"name": "launch_rockets"}})
    assert err.value.status_code == 400 and err.value.body["param"] == "tool_choice"
    assert "launch_rockets" in err.value.body["message"]


def test_a_template_without_tool_support(client):
    """The plain ChatML tokenizer (the conftest's `client`) renders no tool definitions."""
    error = assert_error(chat(client, USER, tools=TOOLS), param="tools")
    assert "no tool support" in error["message"]
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    assert_error(chat(client, USER + [{"role": "assistant", "content": None, "tool_calls": calls},
                                      {"role": "tool", "tool_call_id": "c1", "content": "21"}]), param="tools")
    assert chat(client, USER, tools=[]).status_code == 200  # no tools: a plain request
    assert chat(client, USER, tool_choice="none").status_code == 200


def test_the_circuit_breaker_trips_on_call_tokens(make_tool_app, tool_model, scripted):
    from fastapi.testclient import TestClient

    probe = probe_for(tool_model)
    scripted["text"] = REQUIRED_REST
    request = dict(tools=TOOLS, tool_choice="required", max_tokens=100)
    with TestClient(make_tool_app(probe=probe, refusal=REFUSAL)) as client:
        # Untripped: the call comes back, and every one of its tokens was scored.
        body = chat(client, USER, **request).json()
        assert body["choices"][0]["finish_reason"] == "tool_calls" and body["choices"][0]["message"]["tool_calls"]
        assert body["circuit_breaker"]["tripped"] is False
        events, _ = parse_sse(chat(client, USER, stream=True, **request).text)
        scores = [e["circuit_breaker"]["token_score"] for e in events if "token_score" in e.get("circuit_breaker", {})]
        assert len(scores) == body["usage"]["completion_tokens"]  # one score per token of the call

        # Trip inside the call, after its first generated token.
        index = next((i for i in range(1, len(scores)) if threshold_tripping_at(scores, i) is not None), None)
        if index is None:
            pytest.skip("no token of the call scores above all the tokens before it")
        probe.threshold_logit = threshold_tripping_at(scores, index)

    with TestClient(make_tool_app(probe=probe, refusal=REFUSAL)) as client:  # the monitor fixes its threshold
        body = chat(client, USER, **request).json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "content_filter"
        assert choice["message"] == {"role": "assistant", "content": REFUSAL}
        assert body["circuit_breaker"]["tripped"] is True and body["circuit_breaker"]["token_index"] == index

        events, done = parse_sse(chat(client, USER, stream=True, **request).text)
        assert done and not any(e["choices"][0]["delta"].get("tool_calls") for e in events)
        assert streamed_text(events) == REFUSAL  # the call's text was held back, never sent
        assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert events[-1]["circuit_breaker"]["token_index"] == index


@pytest.mark.parametrize("style, text", [
    ("llama31", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),  # Llama 3.1's JSON call
    ("llama31", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),  # after the special token
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'),  # a special token opens it
])
def test_a_template_serves_its_own_call_format(style, text):
    """The Llama 3.1 and Mistral tool templates (JSON calls with "parameters"; a list after [TOOL_CALLS]; the
    call-opening special tokens, which the decoding keeps): a call goes out as OpenAI tool_calls, streamed and
    not, and no call markup in the streamed text."""
    from fastapi.testclient import TestClient

    from circuit_breakers.serving import engine

    tokenizer = make_tool_tokenizer(style)
    model = make_tiny_model("llama", vocab_size=len(tokenizer), layers=2, seed=0)
    model.config.max_position_embeddings = 2048
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    picked = {}

    def pick(logits, request, generator):
        n = picked[id(request)] = picked.get(id(request), -1) + 1
        return ids[min(n, len(ids) - 1)]

    with pytest.MonkeyPatch.context() as patch, TestClient(app_maker(model, tokenizer)()) as client:
        patch.setattr(engine, "_pick", pick)
        body = chat(client, USER, tools=TOOLS, max_tokens=100).json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls", body
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        picked.clear()
        events, done = parse_sse(chat(client, USER, tools=TOOLS, max_tokens=100, stream=True).text)
        calls = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
        assert done and [c["function"]["name"] for c in calls] == ["get_weather"]
        assert "python_tag" not in streamed_text(events) and "TOOL_CALLS" not in streamed_text(events)
