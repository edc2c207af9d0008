"""stopping: a stop signal is recorded while the handlers are in place, and the loops' `check()` raises on it."""
import signal

import pytest

from circuit_breakers import stopping
from circuit_breakers.attacks._common import generate_from_ids
from circuit_breakers.generation import generate
from circuit_breakers.stopping import StopSignals

from .helpers import make_chat_tokenizer, make_tiny_model


def test_check_raises_only_after_a_signal_inside_the_handlers():
    stopping.check()  # no handlers: nothing to say
    with StopSignals() as signals:
        stopping.check()
        signals.received = signal.SIGTERM  # what the handler records before raising
        with pytest.raises(KeyboardInterrupt):
            stopping.check()
    stopping.check()  # the command is over: a later one starts clean
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handlers_not_installed_stop_nothing():
    with StopSignals(enabled=False) as signals:
        signals.received = signal.SIGINT
        stopping.check()


def test_greedy_generation_stops_before_a_batch_once_a_signal_came():
    """Both generation loops (chat prompts; the attacks' token-id prompts) go through greedy_batch."""
    tokenizer = make_chat_tokenizer()
    model = make_tiny_model(vocab_size=len(tokenizer))
    conversations = [[{"role": "user", "content": "hello"}]]
    assert len(generate(model, tokenizer, conversations, max_new_tokens=2)) == 1
    assert len(generate_from_ids(model, tokenizer, [[5, 6, 7]], max_new_tokens=2)) == 1
    with StopSignals() as signals:
        signals.received = signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            generate(model, tokenizer, conversations, max_new_tokens=2)
        with pytest.raises(KeyboardInterrupt):
            generate_from_ids(model, tokenizer, [[5, 6, 7]], max_new_tokens=2)
