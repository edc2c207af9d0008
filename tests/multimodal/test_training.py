"""RR on tiny vision-language models: the language model's states reroute, the vision tower stays as it was,
LoRA sits on the language model's blocks only, and the merged model and processor load back."""
from __future__ import annotations

import json

import pytest
import torch

from circuit_breakers.cli import main
from circuit_breakers.config import ConfigError, RRConfig
from circuit_breakers.models import find_architecture, load_model
from circuit_breakers.multimodal.processing import MultimodalCollator, ProcessorTokenizer, render_multimodal
from circuit_breakers.training import RRTrainer

from ..helpers import TINY_VLM_FAMILIES, make_tiny_vlm

VISION_PARTS = ("vision_tower", "multi_modal_projector", "vision_model", "connector", "visual")


def vlm_trainer(family, image_sets, **overrides):
    model, processor = make_tiny_vlm(family, layers=6)
    settings = dict(model=f"tiny-{family}", target_layers=[2, 4], steps=4, batch_size=2, lr=2e-2, max_length=256,
                    circuit_breaker_data=[str(image_sets[0])], retain_data=[str(image_sets[1])])
    settings.update(overrides)
    return RRTrainer(RRConfig(**settings), model=model, tokenizer=processor, progress=False)


def vision_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if any(f".{part}." in f".{name}" for part in VISION_PARTS)}


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_rr_trains_the_language_model_only(family, image_sets):
    trainer = vlm_trainer(family, image_sets)
    assert isinstance(trainer.collator, MultimodalCollator)
    assert any(item.images for item in trainer.cb_items) and any(not item.images for item in trainer.cb_items)
    vision_before = vision_state(trainer.model)
    assert vision_before
    lora = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    # LoRA on the language model's kept blocks 0..4 only, never on the vision tower's same-named linears.
    assert lora and all(".language_model.layers." in n or ".text_model.layers." in n for n in lora)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in lora} == set(range(5))
    assert not any(part in n for n in lora for part in VISION_PARTS)

    log = trainer.train().log
    assert log[0]["rerouting_loss"] == pytest.approx(1.0, abs=1e-5)  # B = 0: the trained model is the original
    assert log[-1]["rerouting_loss"] < log[0]["rerouting_loss"] - 1e-3
    assert log[-1]["retain_loss"] > 0
    after = vision_state(trainer.model)
    assert all(torch.equal(after[name], value) for name, value in vision_before.items())


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_merged_model_and_processor_load_back(family, image_sets, tmp_path):
    trainer = vlm_trainer(family, image_sets, steps=2)
    result = trainer.train(tmp_path / "out")
    saved = tmp_path / "out" / "model"
    assert "AutoModelForImageTextToText" in (saved / "README.md").read_text()
    model, tokenizer = load_model(str(saved), device="cpu")
    assert isinstance(tokenizer, ProcessorTokenizer) and type(model) is type(result.model)
    assert find_architecture(model).num_blocks == 6  # the dropped block 5 is back
    assert not any("lora" in name for name, _ in model.named_parameters())
    # The reloaded model computes what the merged one did, on an image+text prompt rendered by the saved processor.
    image = image_sets[0].parent / "images" / "0.png"
    inputs = render_multimodal(tokenizer, [{"role": "user", "content": "Hi"}], [image], add_generation_prompt=True)
    inputs.pop("response_mask")
    with torch.no_grad():
        want = result.model.eval()(**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got, want)


def test_qwen2_vl_merged_model_loads_back(image_sets, tmp_path):
    """Without torchvision (here) Qwen2-VL's processor loads for images only (no video processor)."""
    trainer = vlm_trainer("qwen2_vl", image_sets, steps=1)
    trainer.train(tmp_path / "out")
    model, tokenizer = load_model(str(tmp_path / "out" / "model"), device="cpu")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and find_architecture(model).num_blocks == 6
    assert type(tokenizer.processor).__name__ == "Qwen2VLProcessor" and tokenizer.processor.image_processor


def test_frozen_cache_works_for_images(image_sets):
    cached = vlm_trainer("llava", image_sets, frozen_cache_gb=1.0).train().log
    plain = vlm_trainer("llava", image_sets).train().log
    for a, b in zip(plain, cached):
        assert b["rerouting_loss"] == pytest.approx(a["rerouting_loss"], rel=1e-4, abs=1e-6)


def test_train_cli_on_a_vlm_directory(image_sets, tmp_path, capsys):
    model, processor = make_tiny_vlm("llava", layers=4)
    checkpoint = tmp_path / "tiny-llava"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    out = tmp_path / "out"
    code = main(["train", "--model", str(checkpoint), "--out", str(out), "--no-progress", "steps=2", "batch_size=2",
                 "target_layers=[2,3]", "lr=1e-2", "max_length=128", f"circuit_breaker_data=[{image_sets[0]}]",
                 f"retain_data=[{image_sets[1]}]"])
    assert code == 0, capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "processor_config.json").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    reloaded, tokenizer = load_model(str(out / "model"), device="cpu")
    assert type(reloaded).__name__ == "LlavaForConditionalGeneration" and isinstance(tokenizer, ProcessorTokenizer)


def test_sharded_modes_are_refused_for_vlms(image_sets, monkeypatch):
    from circuit_breakers.training import trainer as trainer_module

    class Sharded:
        name = "fsdp"

    monkeypatch.setattr(trainer_module, "make_parallel", lambda dist: Sharded())
    with pytest.raises(ConfigError, match="fsdp: vision-language models"):
        vlm_trainer("llava", image_sets)
