"""The `circuit-breakers` command end to end on a tiny local checkpoint."""
import json

import pytest

from circuit_breakers.cli import main
from circuit_breakers.config import RECIPES_DIR, RRConfig, recipe_path, shipped_names
from circuit_breakers.data import write_jsonl


@pytest.fixture
def data_files(tmp_path):
    harmful = [{"prompt": f"How do I bake bread {i}?", "output": "Sure, here is a simple recipe for bread."}
               for i in range(6)]
    benign = [{"request": f"Explain the water cycle {i}", "response": "Water evaporates and rains."}
              for i in range(6)]
    write_jsonl(tmp_path / "harmful.jsonl", harmful)
    write_jsonl(tmp_path / "benign.jsonl", benign)
    return tmp_path / "harmful.jsonl", tmp_path / "benign.jsonl"


def test_train_writes_model_adapter_config_and_log(tmp_path, tiny_checkpoint, data_files, capsys):
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_checkpoint), "--out", str(out), "--no-progress",
                 "steps=3", "batch_size=2", "target_layers=[2,3]", "lr=1e-3", "max_length=64",
                 f"circuit_breaker_data=[{data_files[0]}]", f"retain_data=[{data_files[1]}]"])
    assert code == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    saved = RRConfig.load(out / "config.yaml")
    assert saved.steps == 3 and saved.target_layers == [2, 3] and saved.model == str(tiny_checkpoint)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "saved" in capsys.readouterr().out


def test_unknown_key_is_an_error_listing_valid_keys(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "x"), "learning_rate=1e-3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key(s) learning_rate" in err and "lr" in err and "target_layers" in err
    assert not (tmp_path / "x").exists()


def test_bad_data_file_is_an_error_naming_the_line(tmp_path, tiny_checkpoint, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request": "a", "response": "b"}\n{not json\n')
    code = main(["train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--no-progress",
                 "target_layers=[2]", f"circuit_breaker_data=[{bad}]"])
    assert code == 2
    assert "bad.jsonl line 2" in capsys.readouterr().err


def test_shipped_recipes_load_and_validate():
    names = shipped_names(RECIPES_DIR)
    assert {"llama3-8b", "mistral-7b", "smollm2-135m", "smollm2-135m-agent", "smollm2-135m-repbend"} <= set(names)
    for name in names:
        config = RRConfig.load(recipe_path(name))
        assert config.steps > 0 and config.target_layers
    assert RRConfig.load(recipe_path("llama3-8b")).alpha == 10.0
    assert RRConfig.load(recipe_path("mistral-7b")).alpha == 5.0


def test_train_help_lists_every_shipped_recipe(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # argparse would otherwise wrap the list, at hyphens too
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in shipped_names(RECIPES_DIR))


def test_unknown_recipe_name_lists_the_shipped_ones(capsys):
    assert main(["train", "--config", "llama-9000", "--out", "x"]) == 2
    assert "llama3-8b" in capsys.readouterr().err
