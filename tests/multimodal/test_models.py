"""Finding a VLM's language model, its LoRA targets, and loading VLM checkpoints (and refusing others)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from circuit_breakers.config import RRConfig
from circuit_breakers.hidden import decoder_hidden_states
from circuit_breakers.models import ModelError, drop_blocks_after, find_architecture, is_multimodal, load_model
from circuit_breakers.multimodal.processing import render_multimodal
from circuit_breakers.training.lora import add_lora

from ..helpers import TINY_VLM_FAMILIES, make_tiny_model, make_tiny_vlm, write_test_image

LANGUAGE_MODELS = {"llava": "model.language_model", "llava_next": "model.language_model",
                   "idefics3": "model.text_model", "qwen2_vl": "model.language_model"}


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_blocks_are_the_language_models_and_the_decoder_takes_images(family):
    model, _ = make_tiny_vlm(family, layers=3)
    arch = find_architecture(model)
    language = LANGUAGE_MODELS[family]
    assert is_multimodal(model) and arch.blocks_path == f"{language}.layers" and arch.num_blocks == 3
    assert arch.final_norm is model.get_submodule(f"{language}.norm") and arch.decoder is model.model
    dropped = drop_blocks_after(model, 2, arch.blocks_path)
    assert model.config.get_text_config().num_hidden_layers == 2
    dropped.reattach(model, arch.blocks_path)
    assert model.config.get_text_config().num_hidden_layers == 3 and find_architecture(model).num_blocks == 3


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_lora_only_on_the_language_models_kept_blocks(family):
    model, _ = make_tiny_vlm(family, layers=4)
    language = LANGUAGE_MODELS[family]
    # Every linear of blocks 0..2 (the kept blocks for target layer 2), none elsewhere: not the vision tower's
    # blocks, whose linears have the same names (q_proj, ...) in "layers" or "blocks" of their own.
    kept = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(n.startswith(f"{language}.layers.{i}.") for i in range(3))}
    peft = add_lora(model, find_architecture(model), RRConfig(model="x", target_layers=[2], lora_target_modules=["all-linear"]))
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in peft.named_parameters() if ".lora_A." in name}
    assert kept and {n.removeprefix("base_model.model.") for n in wrapped} == kept


def test_text_models_keep_their_lora_config():
    model = make_tiny_model("llama", layers=4)
    peft = add_lora(model, find_architecture(model), RRConfig(model="x", target_layers=[2]))
    config = peft.peft_config["default"]
    assert config.layers_to_transform == [0, 1, 2] and config.layers_pattern == "layers"
    assert not is_multimodal(model) and find_architecture(model).decoder is model.model


def test_load_model_returns_the_processor_for_a_vlm_directory(tmp_path):
    model, processor = make_tiny_vlm("idefics3", layers=2)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    loaded, tokenizer = load_model(str(tmp_path / "vlm"), device="cpu")
    assert type(loaded).__name__ == "Idefics3ForConditionalGeneration" and not loaded.training
    assert type(tokenizer.processor).__name__ == "Idefics3Processor"
    assert tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    assert tokenizer.chat_template == processor.chat_template


def test_a_vision_model_that_is_not_image_text_to_text_is_refused(tmp_path):
    from transformers import CLIPConfig

    CLIPConfig(text_config={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8},
               vision_config={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                              "intermediate_size": 8}).save_pretrained(tmp_path / "clip")
    with pytest.raises(ModelError, match="clip has a vision part but is not an image-text-to-text model"):
        load_model(str(tmp_path / "clip"), device="cpu")


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList([nn.Linear(2, 2)])
        self.language_model.norm = nn.LayerNorm(2)

    def forward(self, input_ids=None, **kwargs):
        return input_ids


class _OddVLM(nn.Module):
    """A model with a vision part whose layout no supported family has."""

    def __init__(self, layout: str):
        super().__init__()
        self.config = SimpleNamespace(vision_config={}, model_type="odd_vlm")
        if layout == "unknown":
            self.decoder_stack = nn.ModuleList([nn.Linear(2, 2)])
        else:
            self.model = _Base()


@pytest.mark.parametrize("layout, problem", [
    ("unknown", "odd_vlm.*language model's blocks are not where the supported families keep them"),
    ("no-images", "odd_vlm.*without a base model `model` that takes pixel_values"),
])
def test_unsupported_vlm_layouts_are_errors(layout, problem):
    with pytest.raises(ModelError, match=problem):
        find_architecture(_OddVLM(layout))


def test_vlm_forward_through_the_decoder_matches_the_full_model(tmp_path):
    """The trainer's decoder (the base model) gives the hidden states the full model's forward does."""
    model, processor = make_tiny_vlm("llava", layers=2)
    image = write_test_image(tmp_path / "a.png")
    inputs = render_multimodal(processor, [{"role": "user", "content": "Hi"}], [image], add_generation_prompt=True)
    inputs.pop("response_mask")
    states = decoder_hidden_states(find_architecture(model), entries=[1, 2], **inputs)
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[1], full[1])
    torch.testing.assert_close(states[2], full[2])


def test_qwen2_vl_processor_loads_without_its_video_part_or_says_why_not(tmp_path):
    model, processor = make_tiny_vlm("qwen2_vl", layers=1)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    _, tokenizer = load_model(str(tmp_path / "vlm"), device="cpu")  # no video processor saved, no torchvision here
    assert type(tokenizer.processor).__name__ == "Qwen2VLProcessor" and tokenizer.processor.image_processor
    (tmp_path / "vlm" / "processor_config.json").unlink()
    with pytest.raises(ModelError, match=r"qwen2_vl model: .*without its video processor \(which needs torchvision"):
        load_model(str(tmp_path / "vlm"), device="cpu")
