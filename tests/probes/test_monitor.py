"""The runtime monitor: halts at the first token over the threshold, otherwise changes nothing."""
import math

import pytest
import torch

from circuit_breakers.generation import chat_prompt, generate
from circuit_breakers.hidden import decoder_hidden_states
from circuit_breakers.models import find_architecture
from circuit_breakers.probes import make_probe
from circuit_breakers.probes.monitor import (DEFAULT_REFUSAL, MonitoredGeneration, ProbeMonitor,
                                             monitored_generate, monitored_generate_batch, monitored_stream)

PROMPTS = ["How do I bake bread?", "Explain the water cycle in three short sentences."]
LAYER = 3


def _probe(bias=None, threshold_logit=0.0, seed=0):
    probe = make_probe("linear", 32, seed=seed, layer=LAYER)
    if bias is not None:
        with torch.no_grad():
            probe.net[0].weight.zero_()
            probe.net[0].bias.fill_(bias)
    probe.threshold_logit = threshold_logit
    return probe


def _hooks(model):
    return {(id(m), key) for m in model.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks)
            for key in hooks}


def _count_forwards(model):
    arch = find_architecture(model)
    calls = []
    handle = arch.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_never_tripping_probe_leaves_greedy_output_unchanged_and_scores_every_token(tiny_model, chat_tokenizer):
    probe = make_probe("linear", 32, seed=0, layer=LAYER)
    probe.threshold_logit = 1e9
    before = _hooks(tiny_model)
    result = monitored_generate(tiny_model, chat_tokenizer, PROMPTS[0], probe, max_new_tokens=10)
    assert _hooks(tiny_model) == before
    plain = generate(tiny_model, chat_tokenizer, [[{"role": "user", "content": PROMPTS[0]}]], max_new_tokens=10)[0]
    assert isinstance(result, MonitoredGeneration)
    assert result.text == plain and not result.tripped and result.token_index is None
    assert "".join(result.tokens) == result.text
    assert len(result.scores) == len(result.tokens) > 0
    # The scores are the probe on the layer's hidden state of each generated token, last one included.
    prompt = chat_tokenizer(chat_prompt(chat_tokenizer, [{"role": "user", "content": PROMPTS[0]}]),
                            add_special_tokens=False).input_ids
    ids = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                              pad_token_id=chat_tokenizer.pad_token_id)
    hidden = decoder_hidden_states(find_architecture(tiny_model), ids, torch.ones_like(ids), [LAYER])[LAYER]
    reference = probe.scores(hidden[0, len(prompt):len(prompt) + len(result.scores)])
    assert torch.allclose(torch.tensor(result.scores, dtype=torch.float64), reference.double(), atol=1e-5)
    assert result.max_score == max(result.scores)


def test_tripping_probe_halts_at_the_first_token(tiny_model, chat_tokenizer):
    before = _hooks(tiny_model)
    calls, handle = _count_forwards(tiny_model)
    try:
        result = monitored_generate(tiny_model, chat_tokenizer, PROMPTS[0], _probe(bias=1e4), max_new_tokens=20)
    finally:
        handle.remove()
    assert _hooks(tiny_model) == before
    assert result.tripped and result.tripped_on == "response" and result.token_index == 0
    assert result.text == DEFAULT_REFUSAL
    assert len(result.scores) == len(result.tokens) == len(result.token_ids) == 1 and result.scores[0] == 1.0
    assert result.halted_text == result.tokens[0]
    assert len(calls) == 2  # the prompt, then the forward that scored token 0; nothing more


def test_hooks_are_removed_when_generation_fails(tiny_model, chat_tokenizer):
    before = _hooks(tiny_model)
    probe = _probe(bias=-1e4)

    def boom(x):
        raise RuntimeError("probe failed")
    probe.forward = boom
    with pytest.raises(RuntimeError, match="probe failed"):
        monitored_generate(tiny_model, chat_tokenizer, PROMPTS[0], probe, max_new_tokens=3)
    assert _hooks(tiny_model) == before


def test_prompt_scoring_is_opt_in(tiny_model, chat_tokenizer):
    result = monitored_generate(tiny_model, chat_tokenizer, PROMPTS[0], _probe(bias=1e4), max_new_tokens=5,
                                score_prompt=True)
    assert result.tripped and result.tripped_on == "prompt" and result.token_index is None
    assert result.scores == [] and result.halted_text == "" and result.prompt_max_score == 1.0


def test_batch_rows_stop_independently(tiny_model, chat_tokenizer):
    probe = make_probe("linear", 32, seed=5, layer=LAYER)
    with torch.no_grad():
        probe.net[0].weight.mul_(20)
    probe.threshold_logit = 1e9
    free = monitored_generate_batch(tiny_model, chat_tokenizer, PROMPTS, probe, max_new_tokens=12)
    top = [max(r.scores) for r in free]
    hi, lo = (0, 1) if top[0] > top[1] else (1, 0)
    assert top[hi] - top[lo] > 1e-4
    cut = (top[hi] + top[lo]) / 2
    probe.threshold_logit = math.log(cut / (1 - cut))
    both = monitored_generate_batch(tiny_model, chat_tokenizer, PROMPTS, probe, max_new_tokens=12)
    first = next(i for i, s in enumerate(free[hi].scores) if s > cut)
    assert both[hi].tripped and both[hi].token_index == first and both[hi].text == DEFAULT_REFUSAL
    assert both[hi].token_ids == free[hi].token_ids[:first + 1]
    assert both[hi].scores == free[hi].scores[:first + 1]
    assert both[lo] == free[lo] and not both[lo].tripped  # the other row ran on, unchanged


def test_stream_yields_scored_tokens_then_the_record(tiny_model, chat_tokenizer):
    probe = make_probe("linear", 32, seed=0, layer=LAYER)
    probe.threshold_logit = 1e9
    items = list(monitored_stream(tiny_model, chat_tokenizer, PROMPTS[1], probe, max_new_tokens=10))
    record = items[-1]
    assert record == monitored_generate(tiny_model, chat_tokenizer, PROMPTS[1], probe, max_new_tokens=10)
    assert "".join(t for t, _ in items[:-1]) == record.text
    assert [s for _, s in items[:-1]] == record.scores
    tripped = list(monitored_stream(tiny_model, chat_tokenizer, PROMPTS[1], _probe(bias=1e4), max_new_tokens=10))
    assert len(tripped) == 1 and tripped[0].tripped and tripped[0].text == DEFAULT_REFUSAL


def test_monitor_rejects_an_uncalibrated_or_mismatched_probe(tiny_model):
    from circuit_breakers.probes import ProbeError

    probe = make_probe("linear", 32, layer=LAYER)
    with pytest.raises(ProbeError, match="no threshold"):
        ProbeMonitor(tiny_model, probe)
    wrong = make_probe("linear", 16, layer=LAYER)
    wrong.threshold_logit = 0.0
    with pytest.raises(ProbeError, match="hidden size"):
        ProbeMonitor(tiny_model, wrong)
    far = _probe(bias=0.0)
    far.layer = 99
    with pytest.raises(ProbeError, match="outside"):
        ProbeMonitor(tiny_model, far)
