"""Images into model inputs: loading, rendering a conversation with image placeholders, batching.

A vision-language model's processor expands each image placeholder the chat template writes into
the image's tokens (how many depends on the family and, for LLaVA-NeXT, Idefics3 and Qwen2-VL, on
the image's size) and turns images into the pixel tensors its vision tower takes. Token ids are
expanded once, when an example is tokenised (`MultimodalFormatter`); pixels are computed per batch
by `MultimodalCollator`, with the same processor, so the two always agree.

VLM chat templates iterate content parts, not strings: every turn is rendered as a list of
{"type": "text"} parts, and an example's images become {"type": "image"} parts at the start of its
last user turn (the request the response answers).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.formatting import ChatFormatter, TokenizedExample, collate
from ..data.schema import DataError
from ..models import ModelError

ImageRef = Any  # a path (str or os.PathLike), raw encoded bytes, or a PIL image
# Processor outputs about the text, not the images: the collator builds those from the stored ids.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids",
                        "text_replacement_offsets"})


class ProcessorTokenizer:
    """A VLM's processor where the code expects a tokenizer (what `models.load_model` returns for a
    vision-language model). Tokenizer attributes and calls go to `processor.tokenizer`, so text-only
    code (generation, judges, the server) works unchanged; `processor` renders and processes images;
    the chat template is the processor's; `save_pretrained` writes the whole processor, so the saved
    directory loads with AutoProcessor."""

    def __init__(self, processor) -> None:
        object.__setattr__(self, "processor", processor)

    @classmethod
    def wrap(cls, obj) -> "ProcessorTokenizer":
        return obj if isinstance(obj, cls) else cls(obj)

    def __getattr__(self, name: str):
        if name == "processor" or name.startswith("__"):  # copy/pickle probe dunders before __init__ ran
            raise AttributeError(name)
        return getattr(self.processor.tokenizer, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "chat_template":
            self.processor.chat_template = value
        setattr(self.processor.tokenizer, name, value)

    @property
    def chat_template(self):
        return self.processor.chat_template or self.processor.tokenizer.chat_template

    def __call__(self, *args, **kwargs):
        return self.processor.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.processor.tokenizer)

    def __repr__(self) -> str:
        return f"ProcessorTokenizer({type(self.processor).__name__})"

    def apply_chat_template(self, conversation, **kwargs):
        """The tokenizer's apply_chat_template with the processor's template, string contents turned into
        text parts (a VLM template given a string content would silently drop it)."""
        kwargs["chat_template"] = kwargs.get("chat_template") or self.chat_template
        if conversation and isinstance(conversation[0], (list, tuple)):  # a batch of conversations
            conversation = [content_parts(c, 0) for c in conversation]
        else:
            conversation = content_parts(conversation, 0)
        return self.processor.tokenizer.apply_chat_template(conversation, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        return self.processor.save_pretrained(save_directory, **kwargs)


def processor_of(obj):
    """The transformers processor behind `obj` (a processor or a ProcessorTokenizer)."""
    return obj.processor if isinstance(obj, ProcessorTokenizer) else obj


def is_processor(obj) -> bool:
    """Whether `obj` is (or wraps) a processor with an image processor: a vision-language model's."""
    return hasattr(processor_of(obj), "image_processor")


def check_processor(processor) -> None:
    """ModelError unless the processor can expand image placeholders (an image processor and an image token)."""
    processor = processor_of(processor)
    missing = [name for name in ("image_processor", "image_token", "tokenizer") if getattr(processor, name, None) is None]
    if missing:
        raise ModelError(f"{type(processor).__name__}: a processor without {', '.join(missing)} is not supported "
                         "for images (supported: LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL)")


# Families whose processor loads a video processor, which needs torchvision: without it they load for images only.
VIDEO_PROCESSOR_FAMILIES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def image_only_processor_class(model_type: str) -> type:
    """The family's processor class without its video processor (Qwen2-VL and Qwen2.5-VL load one, and it needs
    torchvision; images alone do not). Named as the family's own class, so a processor it saves loads with
    AutoProcessor wherever torchvision is installed."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    base = getattr(transformers, VIDEO_PROCESSOR_FAMILIES[model_type])

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The family's __init__ less the video processor: the attributes its __call__ reads for images.
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__,
                                         "__doc__": f"{base.__name__} for images only (no video processor)."})


def load_image_only_processor(path: str, model_type: str):
    """The processor of a saved Qwen2-VL / Qwen2.5-VL checkpoint without its video processor (see
    `image_only_processor_class`)."""
    return image_only_processor_class(model_type).from_pretrained(path)


def load_image(ref: ImageRef):
    """The image `ref` names (a path, raw encoded bytes, or a PIL image) as an RGB PIL image.
    A missing or unreadable file raises DataError naming it."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        source, name = io.BytesIO(bytes(ref)), f"<image of {len(ref)} bytes>"
    else:
        source, name = Path(ref), str(ref)
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except OSError as e:  # PIL.UnidentifiedImageError among them
        raise DataError(f"{name}: not a readable image ({e})") from None


def content_parts(conversation: Sequence[dict], n_images: int) -> list[dict]:
    """The turns with each content a list of parts, `n_images` {"type": "image"} parts at the start of
    the last user turn. A content that is already a list of parts is kept as it is (its image parts
    must then number `n_images` in all)."""
    users = [i for i, turn in enumerate(conversation) if turn.get("role") == "user"]
    if n_images and not users:
        raise ValueError("images need a user turn to go in; the conversation has none")
    turns, given = [], 0
    for i, turn in enumerate(conversation):
        content = turn.get("content")
        if isinstance(content, (list, tuple)):
            parts = list(content)
            given += sum(isinstance(p, dict) and p.get("type") == "image" for p in parts)
        else:
            images = [{"type": "image"} for _ in range(n_images)] if i == users[-1] else []
            parts = images + [{"type": "text", "text": content or ""}]
        turns.append({**turn, "content": parts})
    if given and given != n_images:
        raise ValueError(f"the conversation has {given} image parts for {n_images} images")
    return turns


def render_text(processor, conversation: Sequence[dict], n_images: int, *, add_generation_prompt: bool,
                chat_template: str | None = None, tools=None) -> str:
    """The conversation as text by the processor's chat template (image placeholders not yet expanded)."""
    processor = processor_of(processor)
    extra = {"tools": list(tools)} if tools else {}
    return processor.apply_chat_template(content_parts(conversation, n_images), add_generation_prompt=add_generation_prompt,
                                         tokenize=False, chat_template=chat_template, **extra)


def expand_prompt(processor, text: str, images: Sequence) -> list[int]:
    """Token ids of rendered `text`, each image placeholder expanded into its image's tokens. The template
    writes any special tokens itself, as ChatFormatter assumes for text."""
    processor = processor_of(processor)
    if not images:
        return list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    check_processor(processor)
    loaded = [load_image(ref) for ref in images]
    out = processor(text=[text], images=[loaded], add_special_tokens=False)
    ids = out["input_ids"][0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def image_tensors(processor, images: Sequence[Sequence]) -> dict[str, torch.Tensor]:
    """The pixel tensors of a batch's images, one list per item that has any, as the family's model takes
    them (pixel_values, and image_sizes / pixel_attention_mask / image_grid_thw). One processor call for
    the batch: it pads across items as its model expects (Idefics3's tiles, LLaVA-NeXT's patches)."""
    processor = processor_of(processor)
    check_processor(processor)
    loaded = [[load_image(ref) for ref in refs] for refs in images]
    out = processor(text=[processor.image_token * len(refs) for refs in loaded], images=loaded, padding=True,
                    return_tensors="pt")  # padding: only for the placeholder text, which is thrown away
    return {key: value for key, value in out.items() if key not in _TEXT_KEYS}


def render_multimodal(processor, conversation: list[dict], images, *, add_generation_prompt: bool,
                      response: str | None = None, chat_template: str | None = None) -> dict[str, torch.Tensor]:
    """Model inputs (a batch of one) for `conversation` with `images` in its last user turn.

    `processor`: a transformers processor, or the ProcessorTokenizer `models.load_model` returns for a
    VLM. `conversation`: {"role", "content"} turns, content a string (or already a list of content
    parts, with one {"type": "image"} part per image). `images`: paths, raw bytes or PIL images. Each
    image becomes an {"type": "image"} part before the text of the last user turn; the chat template
    writes its placeholder and the processor expands it into the image's tokens. `response` (e.g. an
    attack's target): text appended after the rendered conversation as it is (no end of turn), its
    tokens marked in `response_mask`. `chat_template`: replaces the processor's own.

    Returns {"input_ids", "attention_mask", "response_mask"} of shape (1, T) and the image tensors the
    family takes (pixel_values, and image_sizes / pixel_attention_mask / image_grid_thw /
    mm_token_type_ids): what `model(**inputs)` takes once `response_mask` is popped. The same
    tensors a training batch holds for this item (built by MultimodalCollator).
    """
    processor = processor_of(processor)
    images = [load_image(ref) for ref in images or ()]
    text = render_text(processor, conversation, len(images), add_generation_prompt=add_generation_prompt,
                       chat_template=chat_template)
    prompt = expand_prompt(processor, text, images)
    tail = list(processor.tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
    return MultimodalCollator(processor)([TokenizedExample(tuple(prompt + tail), len(prompt), images=tuple(images))])


class MultimodalCollator:
    """The trainer's Collator for a vision-language model: items (token ids with image tokens already
    expanded, and their image references) -> input_ids, attention_mask, response_mask (right-padded)
    plus the batch's image tensors. Items without images may share a batch with items that have them:
    the model puts image features into the image tokens in order, and text-only rows have none."""

    stackable = False  # pixel tensors cannot be padded and stacked like token ids

    def __init__(self, processor) -> None:
        self.processor = processor_of(processor)
        self.pad_token_id = self.processor.tokenizer.pad_token_id

    def __call__(self, items: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        batch = collate(items, self.pad_token_id)
        with_images = [item.images for item in items if item.images]
        if not with_images:  # a text-only batch: the inputs a text model gets
            return batch
        if getattr(self.processor, "return_mm_token_type_ids", False):  # Qwen2-VL's M-RoPE reads them
            batch["mm_token_type_ids"] = torch.tensor(
                self.processor.create_mm_token_type_ids(batch["input_ids"].tolist()), dtype=torch.long)
        batch.update(image_tensors(self.processor, with_images))
        return batch


class MultimodalFormatter(ChatFormatter):
    """ChatFormatter for a vision-language model: turns rendered as content parts by the processor's
    chat template, an example's images as image parts of its last user turn, expanded into image
    tokens by the processor. `processor`: a processor or the ProcessorTokenizer around one."""

    def __init__(self, processor, max_length: int, **kwargs) -> None:
        self.processor = processor_of(processor)
        super().__init__(ProcessorTokenizer.wrap(processor), max_length, **kwargs)

    def _render(self, conversation: list[dict], add_generation_prompt: bool, tools=None, n_images: int = 0) -> str:
        return render_text(self.processor, conversation, n_images, add_generation_prompt=add_generation_prompt,
                           chat_template=self.chat_template, tools=tools)

    def _prompt_ids(self, text: str, images: tuple, where: str) -> list[int]:
        try:
            return expand_prompt(self.processor, text, images)
        except DataError as e:
            raise DataError(f'{where}: field "images": {e}') from None
        except ValueError as e:  # the processor: placeholders and images that do not match, an image it cannot take
            raise DataError(f'{where}: field "images": the processor cannot take them: {e}') from None
