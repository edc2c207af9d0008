"""Rendering with images, batching mixed items, and the response mask, for each tiny VLM family."""
from __future__ import annotations

import copy

import pytest
import torch

from circuit_breakers.data import DataError, Example, tokenize_examples
from circuit_breakers.models import find_architecture
from circuit_breakers.multimodal.processing import (MultimodalCollator, MultimodalFormatter, ProcessorTokenizer,
                                                    load_image, render_multimodal)

from ..helpers import TINY_VLM_FAMILIES, VLM_PLACEHOLDERS, make_tiny_vlm, write_test_image

REQUEST = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module", params=TINY_VLM_FAMILIES)
def vlm(request):
    model, processor = make_tiny_vlm(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [write_test_image(folder / "wide.png", (20, 24), 0), write_test_image(folder / "small.png", (12, 12), 1)]


def expected_image_tokens(family, model, processor, inputs) -> int:
    """How many image tokens the family's model expects for the images in `inputs`, from the pixel tensors."""
    if family == "llava_next":  # any resolution: the features its vision tower makes (tiles, minus padding, + newlines)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_sizes=inputs["image_sizes"]).pooler_output
        return sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[0]
    if family == "llava":  # (16 / patch 4)^2 patches per image; the CLS feature is dropped ("default")
        return 16 * inputs["pixel_values"].shape[0]
    if family == "idefics3":  # image_seq_len per tile, tiles not padding (an all-zero tile is padding)
        tiles = (inputs["pixel_values"].flatten(2) != 0).any(-1).sum()
        return processor.image_seq_len * int(tiles)
    return int(inputs["image_grid_thw"].prod(-1).sum()) // processor.image_processor.merge_size ** 2


def test_load_image_from_a_path_bytes_or_pil(images):
    from PIL import Image

    image = load_image(images[0])
    assert image.mode == "RGB" and image.size == (20, 24)
    assert load_image(images[0].read_bytes()).size == (20, 24)
    assert load_image(Image.new("L", (3, 4))).mode == "RGB"


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png: not a readable image"):
        load_image(tmp_path / "text.png")


@pytest.mark.parametrize("count", [1, 2])
def test_rendering_puts_the_image_tokens_in_the_user_turn(vlm, images, count):
    family, model, processor = vlm
    inputs = render_multimodal(processor, REQUEST, images[:count], add_generation_prompt=True)
    ids = inputs["input_ids"][0]
    image_tokens = int((ids == processor.image_token_id).sum())
    assert image_tokens == expected_image_tokens(family, model, processor, inputs) > 0
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("How do I bake bread?<|im_end|>\n<|im_start|>assistant\n")
    assert not inputs["response_mask"].any()
    # Without images: the plain text, no placeholder.
    plain = render_multimodal(processor, REQUEST, [], add_generation_prompt=True)
    assert set(plain) == {"input_ids", "attention_mask", "response_mask"}
    assert VLM_PLACEHOLDERS[family] not in processor.tokenizer.decode(plain["input_ids"][0])


def test_response_mask_covers_the_response_only(vlm, images):
    family, _, processor = vlm
    inputs = render_multimodal(processor, REQUEST, images[:1], add_generation_prompt=True, response="Sure, here is")
    ids, mask = inputs["input_ids"][0], inputs["response_mask"][0]
    assert processor.tokenizer.decode(ids[mask]) == "Sure, here is"
    assert not (mask & (ids == processor.image_token_id)).any()
    assert mask[-int(mask.sum()):].all()  # one span, at the end


def test_formatted_items_mask_the_response_and_its_end_of_turn(vlm, images):
    _, _, processor = vlm
    examples = [Example(response="Sure, here is a recipe.", request="Bake?", images=(str(images[0]),), source="a:1"),
                Example(response="I cannot help.", request="Explain the water cycle.", source="a:2")]
    items = tokenize_examples(examples, MultimodalFormatter(processor, 256))
    assert items[0].images == (str(images[0]),) and items[1].images == ()
    batch = MultimodalCollator(processor)(items)
    for row, response in enumerate(["Sure, here is a recipe.", "I cannot help."]):
        ids, mask = batch["input_ids"][row], batch["response_mask"][row]
        assert processor.tokenizer.decode(ids[mask]) == response + "<|im_end|>\n"
        assert not (mask & (ids == processor.image_token_id)).any()


def test_dropped_instructions_drop_their_images(vlm, images):
    _, _, processor = vlm
    example = Example(response="Sure.", request="Bake?", images=(str(images[0]),), source="a:1")
    (item,) = tokenize_examples([example], MultimodalFormatter(processor, 256, drop_instruction_prob=1.0))
    assert item.images == () and processor.image_token_id not in item.input_ids


def test_mixed_batches_give_each_row_its_own_states(vlm, images):
    """Text-only and image rows in one right-padded batch: each row's hidden states are those of the row alone."""
    family, model, processor = vlm
    examples = [Example(response="Sure.", request="Two pictures", images=(str(images[1]), str(images[0])), source="m:1"),
                Example(response="I cannot help.", request="Explain the water cycle.", source="m:2"),
                Example(response="Sure, here is a recipe.", request="Bake?", images=(str(images[0]),), source="m:3")]
    items = tokenize_examples(examples, MultimodalFormatter(processor, 256))
    collator, decoder = MultimodalCollator(processor), find_architecture(model).decoder

    def states(batch_items):
        batch = collator(batch_items)
        batch.pop("response_mask")
        with torch.no_grad():
            return decoder(**batch, use_cache=False).last_hidden_state, batch["attention_mask"]

    together, mask = states(items)
    for row, item in enumerate(items):
        alone, _ = states([item])
        torch.testing.assert_close(together[row, :item.length], alone[0], rtol=1e-4, atol=1e-5)
        assert mask[row].sum() == item.length


def test_processor_tokenizer_stands_in_for_the_tokenizer(vlm, tmp_path):
    _, _, processor = vlm
    wrapped = ProcessorTokenizer(processor)
    assert wrapped.pad_token_id == processor.tokenizer.pad_token_id and len(wrapped) == len(processor.tokenizer)
    assert wrapped("bread")["input_ids"] == processor.tokenizer("bread")["input_ids"]
    # A string content renders through the VLM's parts template (a VLM template may iterate parts only).
    assert wrapped.apply_chat_template(REQUEST, tokenize=False).startswith("<|im_start|>user\nHow do I bake bread?")
    assert ProcessorTokenizer.wrap(wrapped) is wrapped
    copied = copy.deepcopy(wrapped)
    assert isinstance(copied, ProcessorTokenizer) and copied.processor is not processor


def test_images_and_tools_together_are_refused(vlm, images):
    _, _, processor = vlm
    tool = {"type": "function", "function": {"name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}}
    example = Example(response="Sure.", request="Bake?", images=(str(images[0]),), tools=(tool,), source="t.jsonl:4")
    with pytest.raises(DataError, match='t.jsonl:4: field "images": examples with both images and tools'):
        MultimodalFormatter(processor, 256).format(example)
