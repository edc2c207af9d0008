"""Fixtures for the attack tests: tiny random models (tests/helpers.py), one CPU thread."""
from __future__ import annotations

import pytest
import torch

from circuit_breakers.attacks.base import Behavior
from ..helpers import make_chat_tokenizer, make_tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
