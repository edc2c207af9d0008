"""The fine-tuning (tamper) attack: a copy is tuned, never the given model; N=0 is the direct request; the
attacker's pairs never hold an evaluated request; each N is its own attack with its own budget."""
from __future__ import annotations

import pytest
import torch

from circuit_breakers.attacks import ATTACKS, DirectRequest, make_attack
from circuit_breakers.attacks.base import Behavior
from circuit_breakers.attacks.finetune import attacker_data, fine_tune
from circuit_breakers.data.builtin import generated_set
from circuit_breakers.evaluation.behaviors import builtin_behaviors

FAST = dict(steps=2, train_batch_size=2, max_length=96, max_new_tokens=4)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registered_and_split_per_n():
    assert {"finetune", "finetune_benign"} <= set(ATTACKS)
    parts = make_attack("finetune", ns=[0, 10, 50]).split()
    assert [p.name for p in parts] == ["finetune-0", "finetune-10", "finetune-50"]
    assert [p.config.ns for p in parts] == [(0,), (10,), (50,)]
    assert [p.name for p in make_attack("finetune_benign", ns=[5]).split()] == ["finetune_benign-5"]
    for bad in (dict(method="qlora"), dict(data="mixed"), dict(ns=[-1]), dict(ns=[]), dict(lr=0)):
        with pytest.raises(ValueError):
            make_attack("finetune", **bad)


def test_tunes_a_copy_and_n0_is_the_direct_request(llama, tok, behaviors):
    before = _state(llama)
    zero, four = make_attack("finetune", ns=[0, 4], lr=0.05, **FAST).split()
    direct = DirectRequest(make_attack("direct", max_new_tokens=4).config).run(llama, tok, behaviors)
    out0 = zero.run(llama, tok, behaviors)
    assert [o.generations for o in out0] == [o.generations for o in direct]
    assert {o.attack for o in out0} == {"finetune-0"}
    out4 = four.run(llama, tok, behaviors)
    after = _state(llama)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the given model is untouched
    assert {o.attack for o in out4} == {"finetune-4"} and all(o.extra["examples"] == 4 for o in out4)
    assert out4[0].budget["ns"] == (4,) and out4[0].budget["steps"] == 2 and out4[0].budget["method"] == "lora"
    tuned = four._shared["tuned"][1]  # the cached copy really moved
    assert tuned is not llama
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items() if k in before)
    assert four.run(llama, tok, behaviors[:1])[0].generations == out4[0].generations  # a later chunk: same copy


def test_full_fine_tuning_changes_every_weight_of_the_copy_only(llama, tok):
    before = _state(llama)
    config = make_attack("finetune", method="full", ns=[2], lr=1e-3, **FAST).config
    tuned = fine_tune(llama, tok, generated_set("harmful", "test")[:2], config)
    assert all(torch.equal(before[k], v) for k, v in _state(llama).items())
    assert not torch.equal(tuned.state_dict()["lm_head.weight"], before["lm_head.weight"])


def test_attacker_data_is_disjoint_from_the_evaluated_behaviours():
    evaluated = builtin_behaviors("test")  # the built-in behaviours are the held-out harmful split's requests
    attack = make_attack("finetune", ns=[200])
    pool = generated_set("harmful", "test")
    assert {e.request for e in pool} & {b.request for b in evaluated}  # so they must be removed
    attack.exclude(evaluated[:40])
    data = attack.data(200)
    assert data and len(data) == len(pool) - 40
    assert not {e.request.lower() for e in data} & {b.request.lower() for b in evaluated[:40]}
    train = {e.request for e in generated_set("harmful", "train")}
    assert not {e.request for e in data} & train  # nor the circuit breaker's training set
    # an evaluated behaviour written differently (case, spaces, a context before it) is still removed
    b = evaluated[0]
    shouted = Behavior("x", "  " + b.request.upper() + " ", context="Some context.")
    assert b.request not in {e.request for e in attacker_data(attack.config, [shouted])}
    # the first pairs stay the same when more behaviours are excluded (a fixed shuffle, then filtering)
    first = attack.data(10)
    attack.exclude([Behavior("y", "not a request of the pool")])
    assert [e.request for e in attack.data(10)] == [e.request for e in first]
    benign = make_attack("finetune_benign", ns=[5])
    assert benign.data(5)[0].request in {e.request for e in generated_set("benign", "test")}


def test_too_few_pairs_warn_and_record_the_count(llama, tok, behaviors):
    attack = make_attack("finetune", ns=[500], **FAST).split()[0]
    with pytest.warns(UserWarning, match="only .* attacker pairs"):
        out = attack.run(llama, tok, behaviors[:1])
    assert out[0].extra["examples"] == len(generated_set("harmful", "test"))


def test_a_max_length_that_leaves_nothing_to_learn_is_an_error(llama, tok):
    config = make_attack("finetune", ns=[2], **{**FAST, "max_length": 2}).config
    with pytest.raises(ValueError, match="max_length"):
        fine_tune(llama, tok, generated_set("harmful", "test")[:2], config)
