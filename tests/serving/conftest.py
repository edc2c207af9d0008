"""Fixtures for the server tests: a tiny random Llama with the tiny ChatML tokenizer, apps, a live server."""
from __future__ import annotations

import json
import math
import threading
import time

import pytest

from ..conftest import make_chat_tokenizer, make_tiny_model

fastapi = pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")

MODEL = "tiny-rr"
HUMAN = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="session")
def tokenizer():
    return make_chat_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return make_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=0)


@pytest.fixture(scope="session")
def baseline_model(tokenizer):
    return make_tiny_model("llama", vocab_size=len(tokenizer), layers=4, seed=1)


@pytest.fixture
def make_app(model, tokenizer):
    from circuit_breakers.serving.app import create_app

    def make(**kwargs):
        kwargs.setdefault("model_name", MODEL)
        return create_app(model, tokenizer, **kwargs)

    return make


@pytest.fixture
def client(make_app):
    from fastapi.testclient import TestClient

    with TestClient(make_app()) as c:
        yield c


def chat(client, messages=None, **body):
    """POST a chat completion; returns the response."""
    payload = {"model": MODEL, "messages": messages if messages is not None else HUMAN, "max_tokens": 8, **body}
    return client.post("/v1/chat/completions", json=payload)


def parse_sse(text: str) -> tuple[list[dict], bool]:
    """The JSON payloads of a server-sent event stream, and whether it ended with [DONE]."""
    events, done = [], False
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "an event after [DONE]"
        events.append(json.loads(data))
    return events, done


def streamed_text(events: list[dict]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def assert_error(response, status: int = 400, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def probe_for(model, *, layer: int = 2, threshold_logit: float = 1e9, seed: int = 0):
    """A randomly initialised linear probe on the tiny model (never trips at the default threshold)."""
    import torch

    from circuit_breakers.probes.probe import make_probe

    probe = make_probe("linear", model.config.hidden_size, layer=layer, seed=seed)
    with torch.no_grad():
        probe.net[0].weight.mul_(20)  # spread the scores so thresholds can fall between tokens
    probe.threshold_logit = threshold_logit
    return probe


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def threshold_tripping_at(scores: list[float], index: int) -> float:
    """A threshold logit between max(scores[:index]) and scores[index]; None if there is none."""
    before = max(scores[:index], default=0.0)
    if scores[index] <= before:
        return None
    return logit((before + scores[index]) / 2)


class LiveServer:
    """uvicorn on 127.0.0.1 with a free port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = None

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def live_server(make_app):
    servers = []

    def start(**kwargs):
        server = LiveServer(make_app(**kwargs)).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
