"""Fixtures for the server tests: a tiny random Llama with the tiny ChatML tokenizer, apps, a live server."""
from __future__ import annotations

import pytest

from ..helpers import LiveServer, app_maker, make_chat_tokenizer, make_tiny_model

fastapi = pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")



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
    return app_maker(model, tokenizer)


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
