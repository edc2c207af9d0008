"""Batched greedy generation with a chat template, optionally with a prefilled assistant turn.

`generate` runs the Hugging Face model's own `generate`, unless a vLLM engine was attached to that
model with `use_vllm` (the optional backend of `circuit-breakers eval`): then the same prompt tokens
go to vLLM, which serves the same checkpoint. Only text goes through it; whatever needs the torch
model itself (gradients, activations, hooks) keeps using the torch model.

Conversations with `images` (a vision-language model; `tokenizer` its processor or the
ProcessorTokenizer around it) are rendered by multimodal.processing.render_multimodal and generated one
at a time by the torch model: their pixel tensors differ in shape from image to image.

Inside `reusing_prompt_caches(model)` (the evaluation harness, per model) the prompt KV cache of every
generated row is kept, and a later prompt that extends a kept one prefills only its new tokens: the forced
call's prompt is the direct request's plus the call opening, prefilling's is it plus the prefill.
"""

from __future__ import annotations

import importlib.util
import inspect
import weakref
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from . import stopping
from .batching import length_sorted_batches


def with_system_prompt(conversation: Sequence[dict], system_prompt: str | None) -> list[dict]:
    """`conversation` after a system turn of `system_prompt` (None: unchanged); a conversation that has a system
    turn already gets the prompt before its text."""
    conversation = list(conversation)
    if not system_prompt:
        return conversation
    if conversation and conversation[0].get("role") == "system":
        return [{**conversation[0], "content": f"{system_prompt}\n\n{conversation[0].get('content') or ''}"},
                *conversation[1:]]
    return [{"role": "system", "content": system_prompt}, *conversation]


def chat_prompt(tokenizer, conversation: Sequence[dict], prefill: str = "", tools: Sequence[dict] | None = None) -> str:
    """The text a model sees: the chat template with the assistant header, then `prefill`. `tools`
    (OpenAI tool definitions) are rendered where the template puts them; none when empty."""
    text = tokenizer.apply_chat_template(list(conversation), tools=list(tools) if tools else None,
                                         add_generation_prompt=True, tokenize=False)
    return text + prefill


class VLLMBackend:
    """Greedy generation by a vLLM engine (`pip install vllm`; a CUDA GPU). It shares the GPU with the
    torch model it stands in for, so it takes `gpu_memory_utilization` of the GPU's memory only."""

    def __init__(self, model_path: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.35,
                 seed: int = 0) -> None:
        from vllm import LLM

        self.llm = LLM(model=str(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed)

    def generate(self, prompt_token_ids: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        # Token ids, not text: vLLM would add a BOS the chat template already wrote.
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_token_ids], params,
                                    use_tqdm=False)
        return [output.outputs[0].text for output in outputs]


_BACKENDS: "weakref.WeakKeyDictionary[torch.nn.Module, VLLMBackend]" = weakref.WeakKeyDictionary()


def vllm_usable() -> bool:
    """vLLM is installed and there is a CUDA GPU for it."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def use_vllm(model: torch.nn.Module, model_path: str, **options) -> VLLMBackend:
    """From now on `generate(model, ...)` runs on a vLLM engine serving `model_path` (the same weights)."""
    backend = VLLMBackend(model_path, **options)
    _BACKENDS[model] = backend
    return backend


@torch.no_grad()
def generate(model, tokenizer, conversations: Sequence[list[dict]], *, prefills: Sequence[str] | None = None,
             tools: Sequence[Sequence[dict] | None] | None = None, max_new_tokens: int = 128, batch_size: int = 16,
             progress: bool = False, desc: str = "generating", torch_only: bool = False,
             images: Sequence[Sequence] | None = None) -> list[str]:
    """Greedy completions, batched by similar prompt length; returns the new text only. `tools`: each
    conversation's tool definitions (or None). `torch_only`: never the vLLM backend nor kept prompt caches (for
    a model changed by hooks, which vLLM's copy of the weights and caches computed without them would not
    see). `images`: each conversation's images (paths,
    bytes or PIL images; empty for none), shown in its last user turn."""
    from tqdm.auto import tqdm

    from .tools.calls import call_marker_ids, decode_keeping_call_markers  # here: tools imports this module

    prefills = list(prefills) if prefills is not None else [""] * len(conversations)
    tools = list(tools) if tools is not None else [None] * len(conversations)
    if images is not None and any(images):
        from .multimodal.processing import ProcessorTokenizer, is_processor

        if is_processor(tokenizer):  # a bare processor: its text side for the rows without images
            tokenizer = ProcessorTokenizer.wrap(tokenizer)
        with_images = [i for i, refs in enumerate(images) if refs]
        outputs = _generate_with_images(model, tokenizer, [conversations[i] for i in with_images],
                                        [prefills[i] for i in with_images], [tools[i] for i in with_images],
                                        [images[i] for i in with_images], max_new_tokens)
        rest = [i for i, refs in enumerate(images) if not refs]
        texts = generate(model, tokenizer, [conversations[i] for i in rest], prefills=[prefills[i] for i in rest],
                         tools=[tools[i] for i in rest], max_new_tokens=max_new_tokens, batch_size=batch_size,
                         progress=progress, desc=desc, torch_only=torch_only) if rest else []
        merged = dict(zip(with_images, outputs)) | dict(zip(rest, texts))
        return [merged[i] for i in range(len(conversations))]
    texts = [chat_prompt(tokenizer, c, p, t) for c, p, t in zip(conversations, prefills, tools)]
    backend = None if torch_only else _BACKENDS.get(model)
    if backend is not None:
        return backend.generate([tokenizer(t, add_special_tokens=False).input_ids for t in texts], max_new_tokens)
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    outputs: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    markers = call_marker_ids(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    try:
        for chunk in tqdm(length_sorted_batches(lengths, batch_size), disable=not progress, desc=desc):
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            new = greedy_batch(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, prompt_caches=not torch_only)
            for i, row in zip(chunk, new):
                outputs[i] = decode_keeping_call_markers(tokenizer, row, markers)
    finally:
        tokenizer.padding_side = side
    return outputs


def cache_kwarg(model) -> str:
    """transformers 5.x names the cache argument `cache` (and still accepts `past_key_values` for a
    while); 4.x only knows `past_key_values`."""
    from .models import unwrap

    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a forward or `generate` returned (transformers 5.x: `cache`; 4.x: `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def greedy_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 pad_token_id: int, prompt_caches: bool = True) -> torch.Tensor:
    """The new tokens of `model.generate` on one left-padded batch, greedy. Under `reusing_prompt_caches(model)`
    (and `prompt_caches`: False for a model changed by hooks) the batch starts from the kept caches of the
    prompts its rows extend, when every row extends one, and its own prompts' caches are kept."""
    stopping.check()  # every generation loop comes through here once a batch: a lost Ctrl-C stops it
    store = _PROMPT_CACHES.get(model) if prompt_caches else None
    past = store.past_for(input_ids, attention_mask) if store is not None else None
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_token_id, return_dict_in_generate=store is not None,
                         **({} if past is None else {cache_kwarg(model): past}))
    if store is None:
        return out[:, input_ids.shape[1]:]
    store.keep(input_ids, attention_mask, output_cache(out))
    return out.sequences[:, input_ids.shape[1]:]


class PromptCacheStore:
    """Per-row prompt KV caches of earlier generations on one model, without their padding, kept first come,
    first served up to `max_bytes`. A row's keys were rotated at its own positions, which left padding does
    not move (position ids count real tokens), so its cache fits any batch it is padded into. Only plain
    DynamicCache layers are kept (no sliding-window or other layer types)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.rows: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.reused_tokens = 0  # prompt tokens not prefilled again (for the tests and benchmarks)

    def longest_prefix(self, ids: tuple[int, ...]) -> tuple[int, ...] | None:
        """The longest kept prompt that `ids` extends by at least one token."""
        best = None
        for key in self.rows:
            if len(key) < len(ids) and (best is None or len(key) > len(best)) and ids[:len(key)] == key:
                best = key
        return best

    def past_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """A DynamicCache of this left-padded batch's first positions, from kept rows; None unless every row
        extends a kept prompt. It covers the positions every row has cached: min over rows of padding + kept
        length (positions a row has no cache for at the left are its padding: zeros, masked)."""
        if not self.rows:
            return None
        from transformers import DynamicCache

        pads = (attention_mask == 0).sum(dim=1).tolist()
        keys = [self.longest_prefix(tuple(row[pad:].tolist())) for row, pad in zip(input_ids, pads)]
        if any(key is None for key in keys):
            return None
        width = min(pad + len(key) for pad, key in zip(pads, keys))
        cache = DynamicCache()
        for layer in range(len(self.rows[keys[0]])):
            sample_k, sample_v = self.rows[keys[0]][layer]
            k = sample_k.new_zeros((len(keys), sample_k.shape[0], width, sample_k.shape[-1]))
            v = sample_v.new_zeros((len(keys), sample_v.shape[0], width, sample_v.shape[-1]))
            for r, (pad, key) in enumerate(zip(pads, keys)):
                kept_k, kept_v = self.rows[key][layer]
                k[r, :, pad:width], v[r, :, pad:width] = kept_k[:, :width - pad], kept_v[:, :width - pad]
            cache.update(k, v, layer)
        self.reused_tokens += sum(width - pad for pad in pads if width > pad)
        return cache

    def keep(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> None:
        """Keep each row's prompt part of `cache` (the cache `generate` returned for this batch)."""
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return
        width = input_ids.shape[1]
        pads = (attention_mask == 0).sum(dim=1).tolist()
        for r, pad in enumerate(pads):
            key = tuple(input_ids[r, pad:].tolist())
            if key in self.rows:
                continue
            row = [(layer.keys[r, :, pad:width].clone(), layer.values[r, :, pad:width].clone()) for layer in layers]
            size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in row)
            if self.bytes + size > self.max_bytes:
                return
            self.rows[key] = row
            self.bytes += size


_PROMPT_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, PromptCacheStore]" = weakref.WeakKeyDictionary()


@contextmanager
def reusing_prompt_caches(model: torch.nn.Module, max_gb: float = 1.0) -> Iterator[PromptCacheStore | None]:
    """Within: `generate` on `model` keeps its prompts' KV caches (up to `max_gb`) and starts a prompt that
    extends a kept one from that cache. Greedy outputs are those of a full prefill up to the last bits of the
    arithmetic (a cached row was computed in another batch). `max_gb` 0, or no torch model: off (yields None)."""
    if max_gb <= 0 or not isinstance(model, torch.nn.Module):
        yield None
        return
    store = _PROMPT_CACHES[model] = PromptCacheStore(int(max_gb * 2**30))
    try:
        yield store
    finally:
        _PROMPT_CACHES.pop(model, None)


@torch.no_grad()
def _generate_with_images(model, processor, conversations: Sequence[list[dict]], prefills: Sequence[str],
                          tools: Sequence, images: Sequence[Sequence], max_new_tokens: int) -> list[str]:
    """Greedy completions of image conversations, one at a time (see the module docstring)."""
    from .multimodal.processing import is_processor, processor_of, render_multimodal

    if not is_processor(processor):
        raise ValueError("conversations with images need the vision-language model's processor (or the "
                         "ProcessorTokenizer models.load_model returns), not a plain tokenizer")
    if any(tools):
        raise ValueError("a conversation with both images and tool definitions is not supported")
    tokenizer = processor_of(processor).tokenizer
    parameter = next(model.parameters())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for conversation, prefill, refs in zip(conversations, prefills, images):
        inputs = render_multimodal(processor, list(conversation), refs, add_generation_prompt=True,
                                   response=prefill or None)
        inputs.pop("response_mask")
        inputs = {k: v.to(parameter.device, parameter.dtype) if v.is_floating_point() else v.to(parameter.device)
                  for k, v in inputs.items()}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        outputs.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs
