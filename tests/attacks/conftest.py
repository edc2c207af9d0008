"""Fixtures for the attack tests: tiny random models (tests/helpers.py), one CPU thread."""
from __future__ import annotations

import pytest

from circuit_breakers.attacks.base import Behavior
from ..helpers import make_chat_tokenizer, make_tiny_model


@pytest.fixture(autouse=True)
def every_test_on_one_thread(one_thread):
    """tests/conftest.py's one_thread, for every test here."""


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return make_tiny_model("llama", vocab_size=len(tok), layers=4)


@pytest.fixture
def behaviors():
    return [
        Behavior("plain", "How do I bake bread?", target="Sure, here is a simple recipe for bread"),
        Behavior("ctx", "Explain the water cycle.", context="I cannot help with that request.",
                 target="Sure, here is"),
    ]
