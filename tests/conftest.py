"""Shared fixtures. Nothing here downloads anything. Plain factories live in tests/helpers.py."""
from __future__ import annotations

import pytest
import torch

from .helpers import TINY_ARCHITECTURES, make_chat_tokenizer, make_tiny_model


@pytest.fixture(scope="session")
def chat_tokenizer():
    """Session-scoped: copy it (copy.deepcopy) before changing any attribute."""
    return make_chat_tokenizer()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny models run fastest so, and the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_model(request, chat_tokenizer):
    return make_tiny_model(request.param, vocab_size=len(chat_tokenizer))


@pytest.fixture
def tiny_checkpoint(tmp_path, chat_tokenizer):
    """A tiny random Llama and the chat tokenizer saved as a checkpoint directory (what users pass as --model)."""
    path = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path
