"""The training methods beside RR (training/methods.py) on tiny random models: repbend's step-1 terms against a
direct computation with the original model, its KL against the models' own logits, the latent adversary's
ball and effect, what is trained, that a few steps lower each method's loss, and the config's errors."""
import copy

import pytest
import torch

from circuit_breakers.config import ConfigError, RRConfig, recipe_path
from circuit_breakers.data.builtin import refusal_texts
from circuit_breakers.losses import restoration_cosine
from circuit_breakers.training.methods import perturbed, prompt_positions

from ..helpers import make_tiny_model, tiny_trainer


def _states(model, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """The original model's output_hidden_states for one unpadded item (entry l: batch row 0)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------- RR


def test_retain_response_weight_is_a_weighted_mean_over_the_tokens():
    """retain_response_weight w: L_r (masked_mean) = sum_t m_t d_t / sum_t m_t with m = 1 at prompt tokens and w at
    response tokens; w = 1 is the paper's plain mean. The logged retain cosine stays over the real tokens alike."""
    from circuit_breakers.losses import retain_loss
    from circuit_breakers.training.batches import Batch
    from circuit_breakers.training.methods import retain_token_weights

    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    batch = Batch({"attention_mask": attention}, response, [0, 1])
    lora, orig = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    distance = (lora - orig).norm(dim=-1)
    for w in (1.0, 4.0, 0.0):
        weights = retain_token_weights(RRConfig(retain_response_weight=w), batch)
        m = attention.float() * torch.where(response, w, 1.0)
        got = retain_loss({1: lora}, {1: orig}, weights, [1], normalization="masked_mean")
        assert float(got) == pytest.approx(float((m * distance).sum() / m.sum()), rel=1e-6)
    assert retain_token_weights(RRConfig(), batch) is attention  # the paper's mask, untouched


# ---------------------------------------------------------------- RepBend


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_repbend_step_one_terms_equal_the_direct_computation(chat_tokenizer, kind):
    """Step 1 (LoRA B = 0): safe_L2 = KL = unsafe_L2 = 0; the cosine and refusal terms are those of the original
    model's own states, computed here item by item without padding."""
    model = make_tiny_model(kind, vocab_size=len(chat_tokenizer))
    original = copy.deepcopy(model)
    trainer = tiny_trainer(model, chat_tokenizer, n_cb=2, n_retain=2, steps=1, method="repbend",
                           repbend_refusal_weight=2.0, repbend_refusal_tokens=6)
    # Every block kept (the KL reads the logits); unsafe layers from 5/8 of the depth; LoRA up to them.
    assert trainer.dropped is None and trainer.target_layers == [4, 5]
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in _lora(trainer)} == set(range(6))
    (record,) = trainer.train().log
    assert record["c_s"] == record["c_r"] == 1.0
    assert record["retain_loss"] == 0.0 and record["repbend_safe_l2"] == 0.0 and record["repbend_kl"] == 0.0
    assert record["repbend_unsafe_l2"] == 0.0

    items, layers, k = trainer.cb_items, [4, 5], 6
    harmful = [_states(original, list(item.input_ids)) for item in items]
    last = [item.response_start - 1 for item in items]
    cos_term = sum(1 - _cos(harmful[0][l][last[0]], harmful[1][l][last[1]]) for l in layers) / len(layers)
    refusals = [chat_tokenizer(text, add_special_tokens=False)["input_ids"] for text in refusal_texts()]
    distances = []
    for index, item in enumerate(items):
        refusal = refusals[index % len(refusals)][:k - 1]
        paired = _states(original, list(item.input_ids[:item.response_start]) + refusal)
        count = min(k, item.length - item.response_start + 1, len(refusal) + 1)
        distances += [float((harmful[index][l][p] - paired[l][p]).norm())
                      for l in layers for p in range(last[index], last[index] + count)]
    refusal_term = sum(distances) / len(distances)
    assert record["repbend_cos_term"] == pytest.approx(cos_term, rel=1e-4)
    assert record["repbend_refusal"] == pytest.approx(refusal_term, rel=1e-4)
    assert record["rerouting_loss"] == pytest.approx(0.3 * cos_term + 2.0 * refusal_term, rel=1e-4)


def test_repbend_kl_and_l2_terms_against_the_models_own_logits(chat_tokenizer):
    """After some training: the KL term equals tau^2 KL(original || trained) of the PEFT model's own logits, summed
    over real tokens per sequence; unsafe_L2 has grown (it is maximised)."""
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=3, method="repbend", lora_dropout=0.0, lr=1e-2,
                           repbend_unsafe_layers=[2, 3], repbend_kl_temperature=1.5)
    assert trainer.dropped is None and trainer.target_layers == [2, 3]
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in _lora(trainer)} == {0, 1, 2, 3}
    log = trainer.train().log
    assert log[-1]["repbend_unsafe_l2"] > 0.0
    batch = trainer._batch(trainer.retain_items, [0, 3])
    loss, _ = trainer.retain_terms(batch)
    terms = trainer.method.take_metrics()
    ids, mask = batch.inputs["input_ids"], batch.attention_mask.bool()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids, attention_mask=batch.attention_mask).logits[mask]
        with trainer.model.disable_adapter():
            frozen = trainer.model(input_ids=ids, attention_mask=batch.attention_mask).logits[mask]
    p, log_q = torch.softmax(frozen.double() / 1.5, -1), torch.log_softmax(trained.double() / 1.5, -1)
    kl = float((p * (p.log() - log_q)).sum()) * 1.5 ** 2 / 2
    assert terms["repbend_kl"] == pytest.approx(kl, rel=1e-4) and kl > 0
    assert loss.item() == pytest.approx(0.5 * terms["repbend_safe_l2"] + 0.3 * kl, rel=1e-5)


# ---------------------------------------------------------------- RR with a latent adversary


def test_rr_lat_step_one_is_rrs(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=1, method="rr_lat", lat_layers=[1], lat_steps=3)
    (record,) = trainer.train().log
    assert record["retain_loss"] == 0.0 and record["rerouting_loss"] == pytest.approx(1.0, abs=1e-6)
    # The trained model is the original: any perturbation lowers the cosine, so the adversary keeps none.
    assert record["lat_cos_clean"] == record["lat_cos_attacked"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lat_perturbation_stays_in_the_ball_at_prompt_positions_and_restores_the_harmful_states(chat_tokenizer, kind):
    model = make_tiny_model(kind, vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=3, method="rr_lat", lora_dropout=0.0, lat_layers=[0, 1],
                           lat_steps=6, lat_eps=0.3, lat_step_size=0.1)
    trainer.train()  # moves the harmful states away from the original
    batch = trainer._batch(trainer.cb_items, [1, 4])
    orig = trainer._frozen(batch, trainer.target_layers, None)
    lora_before = _lora(trainer)
    deltas, clean, attacked = trainer.method.attack(trainer, batch, orig)
    assert clean < 0.99 and attacked > clean + 1e-3
    assert all(p.grad is None for p in trainer.trainable)  # the inner attack leaves the parameters no gradient
    assert _lora(trainer).keys() == lora_before.keys()
    where = prompt_positions(batch)
    clean_states = trainer._trained(batch, [0, 1])
    for layer, delta in deltas.items():
        norms = clean_states[layer].detach().norm(dim=-1)
        assert torch.all(delta.norm(dim=-1) <= 0.3 * norms * (1 + 1e-5) + 1e-7)
        assert torch.all(delta[where[..., 0] == 0] == 0)  # response and padding never perturbed
        assert delta.norm() > 0
    with perturbed(trainer.arch, deltas, where):
        again = restoration_cosine(trainer._trained(batch, trainer.target_layers), orig, batch.attention_mask,
                                   trainer.target_layers)
    assert again.item() == pytest.approx(attacked, abs=1e-5)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in trainer.arch.blocks)  # hooks removed


def test_rr_lat_under_activation_checkpointing_trains_as_without(chat_tokenizer):
    """Checkpointed blocks rerun their forward in the backward, after the perturbation's hooks are gone: the
    same steps with and without checkpointing still give the same weights."""
    weights = []
    for checkpointing in ("false", "true"):
        model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
        trainer = tiny_trainer(model, chat_tokenizer, steps=3, method="rr_lat", lora_dropout=0.0, lat_layers=[1],
                               lat_steps=3, gradient_checkpointing=checkpointing)
        trainer.train()
        weights.append(_lora(trainer))
    for name, value in weights[0].items():
        assert torch.allclose(weights[1][name], value, atol=1e-6, rtol=1e-4), name


# ---------------------------------------------------------------- every method beside RR


@pytest.mark.parametrize("method, settings", [
    ("repbend", dict(repbend_refusal_weight=1.0)),
    ("rr_lat", dict(lat_layers=[1], lat_steps=2)),
    ("refusal", dict(target_layers=[3])),
])
def test_only_lora_parameters_change(chat_tokenizer, method, settings):
    model = make_tiny_model("qwen2", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=2, method=method, **settings)
    params = dict(trainer.model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if "lora_" in n}
    base = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    lora = _lora(trainer)
    trainer.train()
    assert all(torch.equal(params[n], v) for n, v in base.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())


def test_a_few_steps_lower_the_methods_loss(chat_tokenizer):
    """One fixed batch of each set (two items each), no dropout. rr_lat: the rerouting loss under the attack
    goes down. repbend: its harmful side (-beta unsafe_L2 + gamma cos_term) goes down; its safe side starts at
    its minimum (the original model), jumps with the first steps and is then pulled back down."""
    def run(**settings):
        model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
        trainer = tiny_trainer(model, chat_tokenizer, n_cb=2, n_retain=2, steps=6, lora_dropout=0.0, **settings)
        return trainer.train().log

    log = run(method="rr_lat", lat_layers=[1], lat_steps=3, lr=1e-2)
    assert log[-1]["rerouting_loss"] < log[0]["rerouting_loss"] - 0.05, [r["rerouting_loss"] for r in log]
    log = run(method="repbend", lr=3e-3)
    harmful, safe = [r["rerouting_loss"] for r in log], [r["retain_loss"] for r in log]
    assert harmful[-1] < harmful[0] - 1e-3 and harmful[-1] < 0, harmful
    assert safe[0] == 0.0 and safe[-1] < 0.5 * max(safe), safe


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("values, message", [
    ({"method": "circuit_breakers"}, "method: expected one of rr, repbend, rr_lat"),
    ({"method": "rr_lat", "lat_layers": []}, "lat_layers: method rr_lat needs at least one"),
    ({"method": "rr_lat", "target_layers": [2, 4], "lat_layers": [1, 4]}, r"lat_layers: each entry must be below "
                                                                          r"max\(target_layers\) \(4\)"),
    ({"method": "repbend", "seeded_start": "target"}, "seeded_start: target moves the rerouting target"),
    ({"lat_eps": 0}, "lat_eps: expected a number > 0"),
    ({"retain_response_weight": -1}, "retain_response_weight: expected a number >= 0"),
    ({"lat_steps": 0}, "lat_steps: expected an integer >= 1"),
    ({"lat_layers": [-1]}, "lat_layers: expected an integer >= 0"),
    ({"repbend_unsafe_weight": -0.1}, "repbend_unsafe_weight: expected a number >= 0"),
    ({"repbend_kl_temperature": 0}, "repbend_kl_temperature: expected a number > 0"),
    ({"repbend_unsafe_layers": [0, 3]}, "repbend_unsafe_layers: expected an integer >= 1"),
])
def test_config_errors_name_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        RRConfig.from_dict(values)


def test_rr_is_the_default_and_other_methods_ignore_rr_lat_settings():
    assert RRConfig().method == "rr"
    RRConfig(target_layers=[2, 4])  # the default lat_layers [8] is only checked for rr_lat
    RRConfig(method="repbend", target_layers=[2, 4])


def test_unsafe_layers_past_the_model_and_parallel_modes_are_refused(chat_tokenizer, monkeypatch):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    with pytest.raises(ConfigError, match=r"repbend_unsafe_layers: 9 is past the last hidden-state entry \(6\)"):
        tiny_trainer(model, chat_tokenizer, method="repbend", repbend_unsafe_layers=[4, 9])
    from circuit_breakers.training import trainer as trainer_module
    from circuit_breakers.training.parallel import Distributed

    def two_processes():
        dist = Distributed(mode="ddp")
        dist.world = 2
        return dist
    monkeypatch.setattr(trainer_module, "from_environment", two_processes)
    with pytest.raises(ConfigError, match="method: rr_lat trains in one process only"):
        tiny_trainer(model, chat_tokenizer, method="rr_lat", lat_layers=[1])


@pytest.mark.parametrize("name, method", [("smollm2-135m-repbend", "repbend"), ("smollm2-135m-rr-lat", "rr_lat"),
                                          ("llama3-8b-repbend", "repbend"), ("llama3-8b-rr-lat", "rr_lat")])
def test_method_recipes_load(name, method):
    config = RRConfig.load(recipe_path(name))
    assert config.method == method and config.steps > 0


def test_llama3_repbend_recipe_is_the_papers():
    c = RRConfig.load(recipe_path("llama3-8b-repbend"))
    assert (c.lora_r, c.lora_alpha, c.lr, c.batch_size, c.steps) == (16, 16, 1e-5, 16, 450)
    assert (c.repbend_safe_weight, c.repbend_unsafe_weight, c.repbend_cosine_weight) == (0.5, 0.1, 0.3)
    assert c.lora_target_modules == ["all-linear"]


# ---------------------------------------------------------------- refusal-only fine-tuning (the classic baseline)


def _refusal_answers(tokenizer, items, max_length: int) -> list[tuple[list[int], int]]:
    """(ids, response start) of each circuit-breaker item answered by refusal style i mod n and the ChatML end of
    turn, cut at max_length: what method refusal trains, rebuilt here from the refusal texts."""
    refusals = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in refusal_texts()]
    end = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    return [(list(item.input_ids[:item.response_start])
             + (refusals[index % len(refusals)] + end)[:max_length - item.response_start], item.response_start)
            for index, item in enumerate(items)]


def _responses_nll(model, answers: list[tuple[list[int], int]]) -> tuple[float, list[float]]:
    """(token-mean cross-entropy over every item's response tokens, each item's summed log-likelihood), item by
    item without padding, each token predicted from the position before it."""
    total, count, likelihoods = 0.0, 0, []
    for ids, start in answers:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        item = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
        total, count = total - item, count + len(ids) - start
        likelihoods.append(item)
    return total / count, likelihoods


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_refusal_step_one_losses_equal_the_direct_computation(chat_tokenizer, kind):
    """Step 1 (LoRA B = 0): the refusal side is the original model's token-mean cross-entropy of each request
    answered by its refusal (two of the six cut at max_length), the retain side that of the retain items' own
    responses; the log's c_s, c_r are the constant weights; every block is kept, LoRA on blocks 0..max(target)."""
    model = make_tiny_model(kind, vocab_size=len(chat_tokenizer))
    original = copy.deepcopy(model)
    trainer = tiny_trainer(model, chat_tokenizer, n_cb=6, n_retain=6, batch_size=6, steps=1, method="refusal",
                           refusal_weight=2.0, refusal_retain_weight=0.5)
    assert trainer.dropped is None and trainer.target_layers == [2, 4]
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in _lora(trainer)} == set(range(5))
    answers = _refusal_answers(chat_tokenizer, trainer.cb_items, 64)
    assert sum(len(ids) == 64 for ids, _ in answers) == 2  # the long refusal styles are cut at max_length
    assert chat_tokenizer.decode(answers[0][0][answers[0][1]:]) == refusal_texts()[0] + "<|im_end|>\n"
    (record,) = trainer.train().log
    assert (record["c_s"], record["c_r"]) == (2.0, 0.5)
    refusal_ce, _ = _responses_nll(original, answers)
    retain_ce, _ = _responses_nll(original, [(list(x.input_ids), x.response_start) for x in trainer.retain_items])
    assert record["rerouting_loss"] == pytest.approx(refusal_ce, rel=1e-5)
    assert record["retain_loss"] == pytest.approx(retain_ce, rel=1e-5)
    assert record["cb_cos"] == pytest.approx(1.0, abs=1e-6) and record["retain_cos"] == pytest.approx(1.0, abs=1e-6)


def test_refusal_keeps_every_block_with_lora_up_to_the_target_layer(chat_tokenizer):
    """(That only LoRA parameters change: test_only_lora_parameters_change.)"""
    model = make_tiny_model("qwen2", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=2, method="refusal", target_layers=[3])
    assert trainer.dropped is None  # the logits need every block, though LoRA stops at block 3
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in _lora(trainer)} == {0, 1, 2, 3}


def test_refusal_a_few_steps_lower_the_loss_and_raise_the_refusals_likelihood(chat_tokenizer):
    """One fixed batch of each set (two items each), no dropout: both cross-entropies go down, and the trained
    model gives each request's refusal a higher likelihood than the original does. (Slowly: the tiny random
    model's LM head, std 0.02 on 32 normalised dimensions, cannot make logits much larger than 1.)"""
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    original = copy.deepcopy(model)
    trainer = tiny_trainer(model, chat_tokenizer, n_cb=2, n_retain=2, steps=8, method="refusal", lora_dropout=0.0,
                           lr=2e-2)
    log = trainer.train().log
    refusal, retain = [r["rerouting_loss"] for r in log], [r["retain_loss"] for r in log]
    assert refusal[-1] < refusal[0] - 0.1, refusal
    assert retain[-1] < retain[0], retain
    answers = _refusal_answers(chat_tokenizer, trainer.cb_items, 64)
    before, before_items = _responses_nll(original, answers)
    after, after_items = _responses_nll(trainer.model, answers)
    assert after < before - 0.1, (before, after)
    assert all(a > b for a, b in zip(after_items, before_items)), (before_items, after_items)


@pytest.mark.parametrize("values, message", [
    ({"method": "refusal", "refusal_weight": -1}, "refusal_weight: expected a number >= 0"),
    ({"refusal_retain_weight": -0.5}, "refusal_retain_weight: expected a number >= 0"),
    ({"method": "refusal", "refusal_weight": "high"}, "refusal_weight: expected float"),
    ({"method": "refusal", "seeded_start": "target"}, "seeded_start: target moves the rerouting target of rr and "
                                                      "rr_lat; method refusal has none"),
    ({"method": "refusal", "drop_instruction_prob": 0.5}, r"drop_instruction_prob: method refusal .*\(0.5\)"),
    ({"method": "refusal", "packing": True}, "packing: supported for method rr only"),
    ({"method": "refusal", "target_layers": []}, "target_layers: expected at least one"),
])
def test_refusal_config_errors_name_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        RRConfig.from_dict(values)


def test_refusal_settings_are_ignored_by_the_other_methods(chat_tokenizer):
    assert RRConfig(method="refusal").method == "refusal"
    for method in ("rr", "repbend", "rr_lat"):  # drop_instruction_prob and zero weights are theirs to use
        RRConfig(method=method, target_layers=[2, 4], lat_layers=[1], drop_instruction_prob=0.5, refusal_weight=0.0,
                 refusal_retain_weight=0.0)
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    with pytest.raises(ConfigError, match=r"target_layers: 9 is past the last hidden-state entry \(6\)"):
        tiny_trainer(model, chat_tokenizer, method="refusal", target_layers=[2, 9])


@pytest.mark.parametrize("name", ["smollm2-135m-refusal", "llama3-8b-refusal"])
def test_refusal_recipes_load(name):
    config = RRConfig.load(recipe_path(name))
    assert config.method == "refusal" and config.steps > 0 and config.drop_instruction_prob == 0.0
    assert config.refusal_weight > 0 and config.refusal_retain_weight > 0 and not config.refusal_retain
