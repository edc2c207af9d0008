"""RRConfig: paper defaults, typed key=value overrides, YAML recipes, helpful errors."""
import dataclasses
import re
import typing

import pytest

from circuit_breakers.config import COMMAND_LINE, RANGES, ConfigError, RRConfig, parse_overrides, read_yaml


def test_defaults_are_the_papers():
    c = RRConfig()
    assert c.lr == 1e-4 and isinstance(c.lr, float)
    assert c.alpha == 10.0
    assert c.target_layers == [10, 20]
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (16, 16, 0.05)
    assert c.lora_target_modules == ["auto"]  # the paper's seven projections where they exist
    assert c.steps == 150 and c.batch_size == 16 and c.grad_accum == 1
    assert c.max_grad_norm == 1.0 and c.weight_decay == 0.0
    assert c.seed == 42
    assert c.full_layers is False
    assert c.retain_distance == "l2" and c.reroute_tokens == "all" and c.retain_weight == 1.0
    assert c.reference_length == 1024


def test_list_defaults_are_not_shared():
    a, b = RRConfig(), RRConfig()
    a.target_layers.append(30)
    assert b.target_layers == [10, 20]
    assert RRConfig().target_layers == [10, 20]


def test_denominator_defaults_to_twice_the_steps():
    assert RRConfig().denominator == 300
    assert RRConfig(steps=40).denominator == 80
    assert RRConfig(steps=40, schedule_denominator=7).denominator == 7


def test_kept_blocks():
    assert RRConfig().kept_blocks == 21  # blocks 0..20, as in the reference
    assert RRConfig(target_layers=[2, 3]).kept_blocks == 4


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("item, key, expected", [
    ("lr=1e-3", "lr", 1e-3),  # YAML 1.1 reads 1e-3 as a string: it must still become a float
    ("lr=0.0005", "lr", 5e-4),
    ("alpha=5", "alpha", 5.0),
    ("steps=20", "steps", 20),
    ("target_layers=[8,16]", "target_layers", [8, 16]),
    ("target_layers=12", "target_layers", [12]),
    ("full_layers=False", "full_layers", False),
    ("full_layers=false", "full_layers", False),
    ("full_layers=True", "full_layers", True),
    ("refusal_retain=no", "refusal_retain", False),  # YAML 1.1 boolean
    ("gradient_checkpointing=true", "gradient_checkpointing", "true"),
    ("schedule_denominator=null", "schedule_denominator", None),
    ("schedule_denominator=64", "schedule_denominator", 64),
    ("blocks_path=model.layers", "blocks_path", "model.layers"),
    ("retain_data=[a.jsonl,b.jsonl]", "retain_data", ["a.jsonl", "b.jsonl"]),
    ("circuit_breaker_data=harm.jsonl", "circuit_breaker_data", ["harm.jsonl"]),
])
def test_override_types(item, key, expected):
    config = RRConfig.load(overrides=[item])
    value = getattr(config, key)
    assert value == expected
    assert type(value) is type(expected)


def test_bool_false_never_turns_on():
    # The reference's argparse `type=bool` made "False" true. It must not come back, in any spelling.
    for raw in ("False", "false", "FALSE", "no", "off"):
        assert RRConfig.load(overrides=[f"full_layers={raw}"]).full_layers is False
    assert RRConfig(full_layers="False").full_layers is False
    assert RRConfig(full_layers="true").full_layers is True


def test_several_overrides_and_later_wins():
    config = RRConfig.load(overrides=["steps=10", "batch_size=4", "grad_accum=2", "steps=12"])
    assert (config.steps, config.batch_size, config.grad_accum) == (12, 4, 2)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        RRConfig.load(overrides=["learning_rate=1e-3"])
    message = str(err.value)
    assert "learning_rate" in message
    assert "valid keys" in message
    for name in (f.name for f in dataclasses.fields(RRConfig)):
        assert name in message


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["=3"])


@pytest.mark.parametrize("item, field", [
    ("steps=abc", "steps"),
    ("steps=1.5", "steps"),
    ("lr=fast", "lr"),
    ("alpha=true", "alpha"),
    ("full_layers=maybe", "full_layers"),
    ("target_layers=[a]", "target_layers"),
    ("model=[1, 2]", "model"),
])
def test_wrong_type_names_the_field(item, field):
    with pytest.raises(ConfigError, match=rf"\b{field}: expected"):
        RRConfig.load(overrides=[item])


@pytest.mark.parametrize("item, field", [
    ("retain_normalization=mean", "retain_normalization"),
    ("retain_distance=cosine", "retain_distance"),
    ("reroute_tokens=request", "reroute_tokens"),
    ("truncation=left", "truncation"),
    ("gradient_checkpointing=sometimes", "gradient_checkpointing"),
])
def test_bad_choice_values(item, field):
    with pytest.raises(ConfigError) as err:
        RRConfig.load(overrides=[item])
    assert field in str(err.value) and "expected one of" in str(err.value)


@pytest.mark.parametrize("values, fragment", [
    ({"steps": 0}, "steps"),
    ({"lr": -1e-4}, "lr"),
    ({"lora_r": 0}, "lora_r"),
    ({"target_layers": []}, "target_layers"),
    ({"target_layers": [0, 5]}, "target_layers"),
    ({"batch_size": 6, "grad_accum": 4}, "grad_accum"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"drop_instruction_prob": 1.5}, "drop_instruction_prob"),
    ({"schedule_denominator": 0}, "schedule_denominator"),
    ({"frozen_cache_gb": -1}, "frozen_cache_gb: expected a number >= 0"),
    ({"max_length": 1}, "max_length: expected an integer >= 16"),
    ({"lr": float("nan")}, "lr"),
    ({"alpha": float("inf")}, "alpha"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"retain_weight": -1}, "retain_weight"),
    ({"seed": -1}, "seed"),
    ({"save_every": -1}, "save_every"),
    ({"keep_checkpoints": 0}, "keep_checkpoints"),
    ({"activation_memory_gb": 0}, "activation_memory_gb"),
])
def test_bad_values(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RRConfig.from_dict(values)


def test_every_numeric_field_has_a_range():
    hints = typing.get_type_hints(RRConfig)
    numeric = {f.name for f in dataclasses.fields(RRConfig)
               if {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}}
    assert numeric == set(RANGES)
    for key, bounds in RANGES.items():  # every default lies in its range
        default = getattr(RRConfig(), key)
        assert all(bounds.contains(v) for v in (default if isinstance(default, list) else [default]) if v is not None)


def test_override_errors_name_the_command_line_and_recipe_errors_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 5\n")
    with pytest.raises(ConfigError) as err:
        RRConfig.load(recipe, ["frozen_cache_gb=-1"])
    assert str(err.value).startswith(f"{COMMAND_LINE}: frozen_cache_gb") and "recipe.yaml" not in str(err.value)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{COMMAND_LINE}: unknown key(s) lrate")):
        RRConfig.load(recipe, ["lrate=1"])
    recipe.write_text("steps: 0\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: steps"):
        RRConfig.load(recipe, ["lr=1e-3"])


# ---------------------------------------------------------------- YAML files


def test_yaml_round_trip(tmp_path):
    config = RRConfig(lr=3e-4, target_layers=[4, 8], full_layers=True, schedule_denominator=50,
                      blocks_path="model.layers", retain_distance="relative_l2", gradient_checkpointing="false")
    path = tmp_path / "sub" / "config.yaml"
    config.save(path)
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name != "config.yaml"]  # no temporary file left
    loaded = RRConfig.load(path)
    assert loaded == config
    assert read_yaml(path)["lr"] == 3e-4


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("lr: 1e-3\nsteps: 30\ntarget_layers: [3, 6]\nfull_layers: false\n")
    config = RRConfig.load(path, overrides=["steps=5"])
    assert config.lr == 1e-3 and config.steps == 5 and config.target_layers == [3, 6]
    assert config.full_layers is False
    assert config.denominator == 10


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert RRConfig.load(path) == RRConfig()


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("lrate: 1\n")
    with pytest.raises(ConfigError, match="recipe.yaml.*lrate"):
        RRConfig.load(path)


def test_wrong_type_in_yaml_names_file_and_field(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: many\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: steps: expected int"):
        RRConfig.load(path)


def test_non_mapping_yaml_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lr\n- steps\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        RRConfig.load(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        RRConfig.load(path)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        RRConfig.load(path)


def test_help_lists_every_field():
    text = RRConfig.help()
    for f in dataclasses.fields(RRConfig):
        assert f"  {f.name} = " in text
