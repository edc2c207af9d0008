"""Chat-template formatting, tokenisation and batching of examples.

An example becomes ``prompt ids + response ids + end-of-turn ids``: the prompt is the
conversation rendered by the model's chat template with the generation prompt, the
response is tokenised on its own so that ``response_start`` marks exactly where the
assistant's text begins.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .schema import DataError, Example

_SENTINEL = "CB_RESPONSE_SENTINEL_5f3a"  # a text no real response contains
_EMPTY_TURN = [{"role": "user", "content": ""}]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    response_start: int  # index of the first response token
    source: str | None = None

    @property
    def length(self) -> int:
        return len(self.input_ids)


class ChatFormatter:
    """Turn Examples into TokenizedExamples with the tokenizer's chat template.

    ``chat_template`` (a Jinja string) replaces the tokenizer's own template; one of
    them must exist. With probability ``drop_instruction_prob`` the conversation is
    replaced by one empty user turn, keeping the response (docs/method.md section 2); the
    choice comes from ``random.Random(seed)`` drawn once per ``format`` call, so the
    same seed and call order give the same choices.

    When prompt + response is longer than ``max_length`` tokens, ``truncation="response"``
    cuts the response (and its end-of-turn tokens) from the end; ``truncation="error"``
    raises DataError. A prompt that leaves no room for one response token always raises.
    """

    def __init__(self, tokenizer: Any, max_length: int, *, drop_instruction_prob: float = 0.0,
                 seed: int = 42, chat_template: str | None = None,
                 truncation: str = "response") -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if not 0.0 <= drop_instruction_prob <= 1.0:
            raise ValueError(f"drop_instruction_prob must be in [0, 1], got {drop_instruction_prob}")
        if truncation not in ("response", "error"):
            raise ValueError(f'truncation must be "response" or "error", got {truncation!r}')
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.drop_instruction_prob = drop_instruction_prob
        self.truncation = truncation
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise DataError(f"tokenizer {name!r} has no chat template; pass `chat_template` "
                            f"(a Jinja string) in the config")
        self._rng = random.Random(seed)
        self.end_of_turn = self._end_of_turn_text()
        self._end_ids = self._ids(self.end_of_turn)

    def _render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False,
            chat_template=self.chat_template)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _end_of_turn_text(self) -> str:
        """What the template writes after an assistant message, e.g. "<|im_end|>\\n"."""
        full = self._render([{"role": "user", "content": "x"},
                             {"role": "assistant", "content": _SENTINEL}], False)
        _, found, tail = full.rpartition(_SENTINEL)
        if found and tail.strip():
            return tail
        eos = getattr(self.tokenizer, "eos_token", None)
        if not eos:
            raise DataError("the chat template marks no end of an assistant turn and the "
                            "tokenizer has no eos_token; responses would never end")
        return eos

    def format(self, example: Example) -> TokenizedExample:
        drop = self._rng.random() < self.drop_instruction_prob
        conversation = _EMPTY_TURN if drop else example.conversation()
        prompt_field = "messages" if example.messages else "request"
        where = example.source or "<unknown source>"
        try:
            prompt = self._ids(self._render(conversation, True))
        except Exception as e:  # jinja raise_exception(), e.g. "roles must alternate"
            raise DataError(f'{where}: field "{prompt_field}": the chat template failed: {e}') from e
        response = self._ids(example.response) + self._end_ids

        if len(prompt) + 1 > self.max_length:
            raise DataError(f'{where}: field "{prompt_field}": the prompt is {len(prompt)} tokens, '
                            f"no room for a response within max_length={self.max_length}")
        total = len(prompt) + len(response)
        if total > self.max_length:
            if self.truncation == "error":
                raise DataError(f'{where}: field "response": prompt + response is {total} tokens, '
                                f'over max_length={self.max_length} (truncation="error")')
            response = response[: self.max_length - len(prompt)]
        return TokenizedExample(tuple(prompt + response), len(prompt), example.source)


def tokenize_examples(examples: Iterable[Example], formatter: ChatFormatter) -> list[TokenizedExample]:
    """Tokenise every example once; the trainer keeps this list."""
    return [formatter.format(example) for example in examples]


def refusal_examples(harmful: list[Example], refusals: list[str], seed: int) -> list[Example]:
    """Pair each harmful request with a seeded random refusal (retain items: refusing stays)."""
    if not refusals:
        raise ValueError("refusals must not be empty")
    rng = random.Random(seed)
    return [Example(response=rng.choice(refusals), request=ex.request, messages=ex.messages,
                    category="refusal", source=ex.source, id=f"{ex.id}-refusal" if ex.id else None)
            for ex in harmful]


def collate(batch: list[TokenizedExample], pad_token_id: int, *, pad_to: int | None = None,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch to its longest item (or ``pad_to``) into input_ids/attention_mask/response_mask."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f'padding_side must be "right" or "left", got {padding_side!r}')
    longest = max(item.length for item in batch)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest item ({longest} tokens)")

    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    response_mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, item in enumerate(batch):
        start = 0 if padding_side == "right" else width - item.length
        end = start + item.length
        input_ids[row, start:end] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, start:end] = 1
        response_mask[row, start + item.response_start:end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
