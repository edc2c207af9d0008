"""Fixtures for the server tests: a tiny random Llama with the tiny ChatML tokenizer, apps, a live server."""
from __future__ import annotations

import pytest

from ..helpers import MODEL, LiveServer, make_chat_tokenizer, make_tiny_model

fastapi = pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")

# The Host names of Starlette's TestClient and of the tests' httpx clients (base_url "http://test", "http://t");
# live servers use 127.0.0.1.
TEST_HOSTS = ("testserver", "test", "t")


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
        kwargs.setdefault("allowed_hosts", TEST_HOSTS)
        return create_app(model, tokenizer, **kwargs)

    return make


@pytest.fixture
def client(make_app):
    from fastapi.testclient import TestClient

    with TestClient(make_app()) as c:
        yield c


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
