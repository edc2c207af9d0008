"""Pieces the attacks share: prompts split around an optimised slot, a reusable prefix KV cache,
generation from token ids or input embeddings, and a context that freezes the model.

Prompt layout of the optimisation attacks (embedding, GCG)::

    [chat template up to the user content] [context + request] [separator]   <- prefix (fixed)
    [optimised slot: free embeddings or suffix tokens]                        <- optimised
    [end of the user turn + assistant header]                                 <- after
    [target]                                                                  <- loss tokens

The template is rendered once with a marker in the slot and cut at the marker, so whatever the
chat template adds (BOS, system prompt, date lines) stays where it belongs, and the user turn's
end-of-turn tokens come after the slot.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..batching import length_sorted_batches
from ..generation import cache_kwarg, chat_prompt, greedy_batch
from ..tools.calls import call_marker_ids, decode_keeping_call_markers
from .base import Behavior

SLOT_MARKER = "\u2063<<ATTACK-SLOT>>\u2063"
DEFAULT_TARGET = "Sure, here is"


def conversation(user_text: str, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user_text}]


def target_of(behavior: Behavior, fallback: str = DEFAULT_TARGET) -> tuple[str, bool]:
    """(the behaviour's affirmative target, whether the fallback was used because it had none)."""
    return (behavior.target, False) if behavior.target else (fallback, True)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class SlotPrompt:
    """A chat prompt cut around the optimised slot (see the module docstring)."""

    prefix_text: str
    after_text: str
    prefix_ids: list[int]
    after_ids: list[int]

    def text(self, slot: str) -> str:
        return self.prefix_text + slot + self.after_text


def slot_prompt(tokenizer, user_text: str, *, separator: str = " ", system_prompt: str | None = None,
                tools: Sequence[dict] | None = None) -> SlotPrompt:
    """The chat prompt with `user_text + separator` before the slot and the assistant header after it;
    `tools` (a tool-use behaviour's definitions) are rendered where the chat template puts them."""
    rendered = chat_prompt(tokenizer, conversation(user_text + separator + SLOT_MARKER, system_prompt), tools=tools)
    if rendered.count(SLOT_MARKER) != 1:
        raise ValueError("the chat template altered the attack-slot marker; cannot place the optimised slot")
    prefix, after = rendered.split(SLOT_MARKER)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    return SlotPrompt(prefix, after, encode(prefix), encode(after))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------- forward passes with a prefix cache


class PrefixCache:
    """The KV cache of a fixed prefix, computed once and handed out fresh (batch-expanded) per forward.

    A forward appends to the cache it is given, so every call gets a deep copy. Works with
    DynamicCache (including sliding-window layers) in transformers 4.5x and 5.x.
    """

    def __init__(self, model, prefix_ids: Sequence[int]):
        self.model = model
        self.kwarg = cache_kwarg(model)
        self.length = len(prefix_ids)
        ids = torch.tensor([list(prefix_ids)], device=model_device(model))
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values

    def fresh(self, batch: int = 1):
        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    def logits(self, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
               keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of (prefix + the given continuation), batched."""
        rows = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        kwargs = {self.kwarg: self.fresh(rows)}
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=True,
                         logits_to_keep=keep, **kwargs)
        return out.logits


def target_loss(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per row of the target tokens.

    `logits` are those of the last T+1 positions (T = target length): positions -T-1..-2 predict
    the target tokens.
    """
    t = target_ids.shape[-1]
    pred = logits[:, -t - 1:-1, :].float()
    targets = target_ids.expand(pred.shape[0], -1) if target_ids.dim() == 1 or target_ids.shape[0] == 1 \
        else target_ids
    loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                                             reduction="none")
    return loss.view(pred.shape[0], t).mean(dim=1)


# ---------------------------------------------------------------- generation


def _eos_pad(model, tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


@torch.no_grad()
def generate_from_ids(model, tokenizer, rows: Sequence[Sequence[int]], *, max_new_tokens: int,
                      batch_size: int = 16) -> list[str]:
    """Greedy completions of exact token-id prompts (left-padded batches); the new text only."""
    pad = _eos_pad(model, tokenizer)
    device = model_device(model)
    markers = call_marker_ids(tokenizer)
    outputs = [""] * len(rows)
    for chunk in length_sorted_batches([len(row) for row in rows], batch_size):
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            row = list(rows[i])
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        new = greedy_batch(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, pad_token_id=pad)
        for r, i in enumerate(chunk):
            outputs[i] = decode_keeping_call_markers(tokenizer, new[r], markers)
    return outputs


@torch.no_grad()
def generate_from_embeds(model, tokenizer, embeds: torch.Tensor, *, max_new_tokens: int,
                         batch_size: int = 16) -> list[str]:
    """Greedy completions of equal-length input-embedding prompts [B, L, D]; the new text only."""
    pad = _eos_pad(model, tokenizer)
    outputs: list[str] = []
    for start in range(0, embeds.shape[0], batch_size):
        chunk = embeds[start:start + batch_size]
        mask = torch.ones(chunk.shape[:2], dtype=torch.long, device=chunk.device)
        generated = model.generate(inputs_embeds=chunk, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad)
        # Given only inputs_embeds, generate returns the new tokens alone.
        outputs.extend(tokenizer.decode(row, skip_special_tokens=True) for row in generated)
    return outputs


# ---------------------------------------------------------------- model state


@contextmanager
def frozen(model) -> Iterator[None]:
    """Eval mode and no parameter gradients for the body; the previous state is restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
