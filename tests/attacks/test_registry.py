import dataclasses

import pytest

from circuit_breakers.attacks import ATTACKS, config_fields, make_attack
from circuit_breakers.attacks.base import budget_of

NAMES = ["direct", "prefilling", "templates", "forced_call", "embedding", "embedding_improved", "gcg", "refusal_ablation",
         "refusal_addition", "base64", "rot13", "leetspeak", "translation", "pair", "image_pgd", "typographic",
         "finetune", "finetune_benign"]


def test_every_name_is_registered_with_a_config_dataclass():
    assert sorted(ATTACKS) == sorted(NAMES)
    for name, cls in ATTACKS.items():
        assert cls.name == name and dataclasses.is_dataclass(cls.config_class)
        instance = make_attack(name)
        assert isinstance(instance.config, cls.config_class)
        budget_of(instance.config)  # plain data


def test_make_attack_with_budget_overrides():
    gcg = make_attack("gcg", num_steps=3, search_width=8)
    assert gcg.config.num_steps == 3 and gcg.config.search_width == 8 and gcg.config.topk == 256
    add = make_attack("refusal_addition", layers=[10, 11], coefficient=0.65)
    assert add.config.layers == (10, 11) and add.config.coefficient == 0.65
    score = lambda b, g: 0.0  # noqa: E731
    pair = make_attack("pair", rounds=2, score_fn=score)
    assert pair.config.rounds == 2 and pair.score_fn is score
    with pytest.raises(ValueError, match="unknown option"):
        make_attack("gcg", num_stepz=3)
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("dan")


def test_reference_defaults():
    assert config_fields("embedding")["num_tokens"] == 20 and config_fields("embedding")["lr"] == 1e-3
    assert config_fields("embedding")["num_steps"] == 500 and config_fields("embedding")["early_stop_loss"] == 0.01
    assert config_fields("embedding_improved")["optimizer"] == "sign"
    assert config_fields("embedding_improved")["n_snapshots"] == 10
    assert config_fields("gcg")["search_width"] == 512 and config_fields("gcg")["topk"] == 256
    assert config_fields("refusal_ablation")["n_prompts"] == 64
    assert config_fields("pair")["rounds"] == 3 and config_fields("direct")["max_new_tokens"] == 256
