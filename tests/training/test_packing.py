"""Packed sequences (training/packing.py): the same states, losses, gradients and training as padded batches."""

import copy

import pytest
import torch

from circuit_breakers.config import ConfigError, RRConfig
from circuit_breakers.hidden import decoder_hidden_states
from circuit_breakers.models import find_architecture
from circuit_breakers.training.batches import TextCollator, make_batch
from circuit_breakers.training.packing import PackingCollator, pack_rows, unpack
from tests.helpers import TINY_ARCHITECTURES, make_tiny_model, tiny_trainer, tokenized_items

PACK = 64  # tokens per row: = max_length of tiny_trainer; the test items are 20-40 tokens, 2-3 per row


@pytest.fixture(scope="module")
def items(chat_tokenizer):
    return tokenized_items(chat_tokenizer, 8, harmful=True) + tokenized_items(chat_tokenizer, 8, harmful=False)


def test_pack_rows_first_fit_decreasing_and_whole_items():
    rows = pack_rows([5, 3, 8, 2, 6], 10)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 24 tokens: the fewest rows of 10
    with pytest.raises(ConfigError, match="pack_length"):
        pack_rows([11], 10)


def test_collator_layout(items, chat_tokenizer):
    out = PackingCollator(chat_tokenizer.pad_token_id, PACK)(items)
    assert "attention_mask" not in out  # transformers masks per item only without a 2D mask
    rows, width = out["input_ids"].shape
    assert rows < len(items) and width <= PACK
    assert int(out["token_mask"].sum()) == sum(x.length for x in items)
    for item, (row, start, length) in zip(items, out["item_spans"].tolist()):
        assert length == item.length
        assert out["input_ids"][row, start:start + length].tolist() == list(item.input_ids)
        assert out["position_ids"][row, start:start + length].tolist() == list(range(length))
        assert out["response_mask"][row, start:start + length].tolist() == [
            t >= item.response_start for t in range(length)]


@pytest.mark.parametrize("kind,attn", [(k, "sdpa") for k in TINY_ARCHITECTURES] + [("llama", "eager")])
def test_packed_hidden_states_equal_padded(kind, attn, items, chat_tokenizer):
    model = make_tiny_model(kind, layers=3)
    model.set_attn_implementation(attn)
    arch = find_architecture(model)
    entries = list(range(arch.num_blocks + 1))
    pad = chat_tokenizer.pad_token_id
    padded = make_batch(TextCollator(pad), items, list(range(len(items))), "cpu")
    packed = make_batch(PackingCollator(pad, PACK), items, list(range(len(items))), "cpu")
    assert packed.packed and len(packed.inputs["input_ids"]) < len(items)
    with torch.no_grad():
        want = decoder_hidden_states(arch, entries=entries, **padded.inputs)
        got = decoder_hidden_states(arch, attention_mask=None, entries=entries, **packed.inputs)
    for entry in entries:
        for k, state in enumerate(unpack(got[entry], packed.spans)):
            torch.testing.assert_close(state, want[entry][k, :items[k].length], rtol=1e-5, atol=1e-5)


def _pair(kind, chat_tokenizer, **overrides):
    """Two trainers on copies of one model, padded and packed, with a LoRA B != 0 and no dropout."""
    model = make_tiny_model(kind)
    # pack_length 128: the circuit-breaker items (33-53 tokens) share rows too
    settings = dict(seeded_start="lora", lora_dropout=0.0, batch_size=4, pack_length=128, **overrides)
    return [tiny_trainer(copy.deepcopy(model), chat_tokenizer, n_cb=8, n_retain=8, packing=packing, **settings)
            for packing in (False, True)]


def _grads(trainer):
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", TINY_ARCHITECTURES)
def test_rr_losses_and_gradients_equal(kind, chat_tokenizer):
    indices = [0, 3, 5, 6]
    results = []
    for trainer in _pair(kind, chat_tokenizer, reroute_tokens="response"):
        cb = trainer._batch(trainer.cb_items, indices)
        retain = trainer._batch(trainer.retain_items, indices)
        assert cb.packed == trainer.config.packing
        if cb.packed:
            assert len(cb.inputs["input_ids"]) < len(indices) and len(retain.inputs["input_ids"]) < len(indices)
        rerouting, per_layer = trainer.rerouting_terms(cb)
        rerouting.backward()
        rerouting_grads = _grads(trainer)
        trainer.model.zero_grad()
        retain_loss, cos = trainer.retain_terms(retain)
        retain_loss.backward()
        results.append((rerouting.item(), per_layer, retain_loss.item(), cos, rerouting_grads, _grads(trainer)))
    (want, got) = results
    assert got[0] == pytest.approx(want[0], rel=1e-5) and got[2] == pytest.approx(want[2], rel=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-5) and got[3] == pytest.approx(want[3], rel=1e-5)
    assert want[2] > 0 and want[0] > 0
    for grads_want, grads_got in ((want[4], got[4]), (want[5], got[5])):
        assert set(grads_got) == set(grads_want)
        for name, value in grads_want.items():
            torch.testing.assert_close(grads_got[name], value, rtol=1e-4, atol=1e-4 * value.abs().max().item(),
                                       msg=name)


def test_training_with_packing_matches_padded(chat_tokenizer):
    """3 steps (the third reads the frozen-state cache of both sets: every item seen in the first epoch)."""
    weights, logs = [], []
    for trainer in _pair("qwen2", chat_tokenizer, steps=3):
        result = trainer.train()
        logs.append(result.log)
        weights.append({name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad})
    (want, got) = weights
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-4 * value.abs().max().item(), msg=name)
    for a, b in zip(*logs):
        assert b["retain_loss"] == pytest.approx(a["retain_loss"], rel=1e-4)
        assert b["rerouting_loss"] == pytest.approx(a["rerouting_loss"], rel=1e-4)


def test_attention_that_ignores_packing_is_an_error(chat_tokenizer, monkeypatch):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # plain causal mask
    with pytest.raises(ConfigError, match="does not keep packed items apart"):
        tiny_trainer(make_tiny_model("llama"), chat_tokenizer, packing=True)


def test_packing_config_checks():
    with pytest.raises(ConfigError, match="pack_length .* at least max_length"):
        RRConfig(packing=True, max_length=128, pack_length=64)
    with pytest.raises(ConfigError, match="method rr only"):
        RRConfig(packing=True, method="repbend")
    assert RRConfig(packing=True).pack_length is None and not RRConfig().packing


def test_checkpoint_planner_sees_the_packed_positions(chat_tokenizer):
    """Auto checkpointing sizes each grad pass by the positions it computes: packed rows, fewer of them."""
    positions = {}
    for trainer in _pair("llama", chat_tokenizer):
        seen = []
        trainer.checkpoint_planner = type("Planner", (), {"plan": lambda self, n: seen.append(n)})()
        batch = trainer._batch(trainer.retain_items, [0, 1, 2, 3])
        trainer._trained(batch, trainer.retain_entries)
        positions[trainer.config.packing] = (seen[0], batch.tokens)
    assert positions[True][1] == positions[False][1]  # the same real tokens
    assert positions[True][0] < positions[False][0]


def test_checkpoint_from_before_packing_resumes(tmp_path):
    """A checkpoint whose config predates the packing keys ran with their defaults: resumable."""
    from circuit_breakers.training.checkpoint import check_resumable

    config = RRConfig()
    saved = {k: v for k, v in config.to_dict().items() if k not in ("packing", "pack_length")}
    check_resumable({"config": saved, "data_fingerprint": "f"}, config, "f", tmp_path)
    with pytest.raises(ConfigError, match="packing"):
        check_resumable({"config": saved, "data_fingerprint": "f"}, RRConfig(packing=True), "f", tmp_path)
