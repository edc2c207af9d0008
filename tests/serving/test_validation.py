"""Every bad request is a 400 (401 for keys) in OpenAI's error shape, and the server keeps serving."""
import json

import pytest

from ..helpers import HUMAN, MODEL, assert_error, chat

OK = {"model": MODEL, "messages": HUMAN, "max_tokens": 4}


def post(client, body):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"messages": [}', b"\xff\xfe\x00", b"", b"   "],
                         ids=["truncated", "text", "broken", "bad-utf8", "empty", "blank"])
def test_invalid_json(client, raw):
    assert_error(post(client, raw))


@pytest.mark.parametrize("body", [[], "a string", 3, None], ids=["list", "string", "number", "null"])
def test_body_not_an_object(client, body):
    assert_error(post(client, body))


BAD = [
    ({"messages": None}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": 8.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": "x"}, "seed"),
    ({"n": 2}, "n"),
    ({"n": 0}, "n"),
    ({"n": "1"}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": "x"}, "stream_options"),
    ({"stop": 5}, "stop"),
    ({"stop": ["#", 1]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize("change,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_parameter(client, change, param):
    assert_error(post(client, {**OK, **change}), param=param)


def test_unknown_model_is_400_model_not_found(client):
    error = assert_error(post(client, {**OK, "model": "gpt-9"}), param="model", code="model_not_found")
    assert MODEL in error["message"]  # says which models exist


def test_missing_model_means_the_served_one(client):
    response = post(client, {"messages": HUMAN, "max_tokens": 2})
    assert response.status_code == 200 and response.json()["model"] == MODEL


def test_oversized_input(make_app):
    from fastapi.testclient import TestClient

    with TestClient(make_app(max_input_tokens=16)) as client:
        long = [{"role": "user", "content": "bread " * 50}]
        assert_error(chat(client, long), param="messages", code="context_length_exceeded")
        assert chat(client, [{"role": "user", "content": "hi"}], max_tokens=2).status_code == 200


def test_prompt_plus_max_tokens_over_the_context(client, model):
    # the tiny model has 256 positions
    long = [{"role": "user", "content": "bread " * 120}]
    assert_error(chat(client, long, max_tokens=200), code="context_length_exceeded")
    # without max_tokens, the answer gets whatever room is left
    assert chat(client, long, max_tokens=None).status_code == 200


def test_body_too_large(client):
    huge = json.dumps({**OK, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]})
    assert_error(post(client, huge), code="request_too_large")


def test_max_tokens_limit_is_the_servers(make_app):
    from fastapi.testclient import TestClient

    with TestClient(make_app(max_tokens_limit=5)) as client:
        assert_error(chat(client, max_tokens=6), param="max_tokens")
        assert chat(client, max_tokens=5).json()["usage"]["completion_tokens"] <= 5
        # no max_tokens: the server's limit caps the default
        assert chat(client, max_tokens=None).json()["usage"]["completion_tokens"] <= 5


def test_pydantic_validation_is_a_400_too(make_app):
    """FastAPI's default 422 is replaced: a typed route's bad parameter is a 400 in the same shape."""
    from fastapi.testclient import TestClient

    app = make_app()

    @app.get("/typed")
    def typed(x: int):
        return {"x": x}

    with TestClient(app) as client:
        assert_error(client.get("/typed", params={"x": "nope"}), param="x")
        assert client.get("/typed", params={"x": 3}).json() == {"x": 3}


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    assert_error(client.get("/v1/chat/completions"), 405)


def test_chat_template_that_rejects_a_conversation(model, tokenizer):
    import copy

    from fastapi.testclient import TestClient

    from circuit_breakers.serving.app import create_app

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    with TestClient(create_app(model, strict, model_name=MODEL, allowed_hosts=["testserver"])) as client:
        error = assert_error(chat(client, [{"role": "system", "content": "x"}, *HUMAN]), param="messages")
        assert "System role not supported" in error["message"]
        assert chat(client).status_code == 200


def test_no_chat_template_fails_at_creation(model, tokenizer):
    import copy

    from circuit_breakers.serving.app import create_app

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        create_app(model, plain, model_name=MODEL)


def test_server_keeps_serving_after_bad_requests(client):
    for change, _ in BAD:
        post(client, {**OK, **change})
    assert chat(client).status_code == 200
