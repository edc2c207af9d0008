"""Chat-template formatting, tokenisation and batching of examples.

An example becomes ``prompt ids + response ids + end-of-turn ids``: the prompt is the
conversation rendered by the model's chat template with the generation prompt, the
response is tokenised on its own so that ``response_start`` marks exactly where the
assistant's text begins.

Examples with tools or tool calls are rendered by the template's own tool support
(``apply_chat_template(..., tools=...)``): the response is the assistant turn as the template
writes it, call included, so the call's tokens are the ones rerouted or retained. For a template
without tool support, ``tool_format="json"`` lists the tools in the first user turn and writes
each call as a JSON object in the assistant's text.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .schema import DataError, Example

_SENTINEL = "CB_RESPONSE_SENTINEL_5f3a"  # a text no real response contains
_EMPTY_TURN = [{"role": "user", "content": ""}]
TOOL_FORMATS = ("template", "json")
# A tool and a call no template writes unless it renders tools: probes whether a template does.
_PROBE_NAME = "cb_probe_tool_5f3a"
_PROBE_TOOL = {"type": "function", "function": {"name": _PROBE_NAME, "description": "A probe.",
                                                 "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}}
_JSON_TOOLS_INTRO = ("You can call the tools below. To call one, answer with a JSON object "
                     '{"name": tool name, "arguments": {argument: value}} on its own line.')


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    response_start: int  # index of the first response token
    source: str | None = None
    images: tuple = ()  # the example's image references (paths or bytes), for a vision-language collator

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

    ``tool_format`` ("template" or "json") says how examples with tools or tool calls are
    written; see the module docstring. "template" with a template that ignores tools raises
    DataError.
    """

    def __init__(self, tokenizer: Any, max_length: int, *, drop_instruction_prob: float = 0.0,
                 seed: int = 42, chat_template: str | None = None,
                 truncation: str = "response", tool_format: str = "template") -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if not 0.0 <= drop_instruction_prob <= 1.0:
            raise ValueError(f"drop_instruction_prob must be in [0, 1], got {drop_instruction_prob}")
        if truncation not in ("response", "error"):
            raise ValueError(f'truncation must be "response" or "error", got {truncation!r}')
        if tool_format not in TOOL_FORMATS:
            raise ValueError(f'tool_format must be "template" or "json", got {tool_format!r}')
        self.tool_format = tool_format
        self._tool_support_checked = False
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.drop_instruction_prob = drop_instruction_prob
        self.truncation = truncation
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise DataError(f"tokenizer {self._name()!r} has no chat template; pass `chat_template` "
                            f"(a Jinja string) in the config")
        self._rng = random.Random(seed)
        self.end_of_turn = self._end_of_turn_text()
        self._end_ids = self._ids(self.end_of_turn)

    def _render(self, conversation: list[dict], add_generation_prompt: bool,
                tools: tuple[dict, ...] | list[dict] | None = None, n_images: int = 0) -> str:
        # n_images: used by a vision-language formatter (multimodal/processing.py); text never has images
        extra = {"tools": list(tools)} if tools else {}
        return self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False,
            chat_template=self.chat_template, **extra)

    def _name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", None) or type(self.tokenizer).__name__

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_ids(self, text: str, images: tuple, where: str) -> list[int]:
        """The rendered prompt's ids; a vision-language formatter expands its image placeholders here."""
        if images:
            raise DataError(f'{where}: field "images": {self._name()!r} is a text-only model (its tokenizer has no '
                            "image processor); images need a vision-language model, loaded with its processor")
        return self._ids(text)

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

    def _check_tool_support(self, where: str) -> None:
        """DataError unless the template writes tools into the prompt and a call into the assistant turn."""
        if self._tool_support_checked:
            return
        turn = [{"role": "user", "content": "x"}]
        try:
            prompt = self._render(turn, True, [_PROBE_TOOL])
            plain = self._render(turn, True)
            full = self._render(turn + [{"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}],
                                False, [_PROBE_TOOL])
        except Exception as e:  # jinja raise_exception(), or a template that chokes on tool_calls
            problem = f"rendering a tool call failed ({e})"
        else:
            problem = ("renders the same prompt with tools as without" if prompt == plain
                       else "does not write a tool call's name in the assistant turn"
                       if _PROBE_NAME not in full[len(prompt):] else None)
        if problem:
            raise DataError(f'{where}: field "tools": the chat template of {self._name()!r} has no tool support: '
                            f"it {problem}. Set tool_format: json (the tools listed in the first user turn, each call "
                            f"written as a JSON object in the assistant's text) or pass a `chat_template` that supports tools")
        self._tool_support_checked = True

    def _template_tool_turn(self, conversation: list[dict], example: Example, where: str) -> tuple[str, str]:
        """(prompt text, response text) of a tool example, the response being the assistant turn as the
        template writes it: any text, the calls and the end of the turn."""
        self._check_tool_support(where)
        prompt = self._render(conversation, True, example.tools)
        full = self._render(conversation + [example.assistant_message()], False, example.tools)
        if not full.startswith(prompt):
            raise DataError(f'{where}: field "tool_calls": the chat template writes the assistant turn differently '
                            f"from its generation prompt, so the response cannot be told from the prompt; set "
                            f"tool_format: json")
        response = full[len(prompt):]
        for name in [call["function"]["name"] for call in example.tool_calls or ()]:
            if name not in response:
                raise DataError(f'{where}: field "tool_calls": the chat template did not write the call of '
                                f"{name!r} into the assistant turn")
        return prompt, response

    @staticmethod
    def _json_calls(content: str, calls) -> str:
        """An assistant text with each call appended as a JSON object on its own line."""
        lines = [content] if content else []
        lines += [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                             ensure_ascii=False) for c in calls or ()]
        return "\n".join(lines)

    def _json_tool_conversation(self, conversation: list[dict], tools) -> list[dict]:
        """The conversation in plain turns: past calls as JSON text, results as user turns, the tools listed
        at the start of the first user turn (a turn every template accepts, unlike system)."""
        turns = []
        for m in conversation:
            if m["role"] == "tool":
                turns.append({"role": "user", "content": f"Tool result:\n{m['content']}"})
            else:
                turns.append({"role": m["role"], "content": self._json_calls(m["content"], m.get("tool_calls"))})
        if tools:
            listing = "\n".join([_JSON_TOOLS_INTRO] + [json.dumps(t, ensure_ascii=False) for t in tools])
            first = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
            if first is None:
                turns.insert(0, {"role": "user", "content": listing})
            else:
                turns[first] = {"role": "user", "content": f"{listing}\n\n{turns[first]['content']}"}
        return turns

    def format(self, example: Example) -> TokenizedExample:
        drop = self._rng.random() < self.drop_instruction_prob
        conversation = _EMPTY_TURN if drop else example.conversation()
        images = () if drop else example.images  # the images belong to the dropped instruction
        prompt_field = "messages" if example.messages else "request"
        where = example.source or "<unknown source>"
        uses_tools = bool(example.tools or example.tool_calls
                          or any(m["role"] == "tool" or m.get("tool_calls") for m in conversation))
        if images and uses_tools:
            raise DataError(f'{where}: field "images": examples with both images and tools are not supported')
        try:
            if not uses_tools:
                prompt_text = self._render(conversation, True, n_images=len(images))
                response = self._ids(example.response) + self._end_ids
            elif self.tool_format == "json":
                prompt_text = self._render(self._json_tool_conversation(conversation, example.tools), True)
                response = self._ids(self._json_calls(example.response, example.tool_calls)) + self._end_ids
            else:
                prompt_text, response_text = self._template_tool_turn(conversation, example, where)
                response = self._ids(response_text)
        except DataError:
            raise
        except Exception as e:  # jinja raise_exception(), e.g. "roles must alternate"
            raise DataError(f'{where}: field "{prompt_field}": the chat template failed: {e}') from e
        prompt = self._prompt_ids(prompt_text, images, where)

        if len(prompt) + 1 > self.max_length:
            raise DataError(f'{where}: field "{prompt_field}": the prompt is {len(prompt)} tokens, '
                            f"no room for a response within max_length={self.max_length}")
        total = len(prompt) + len(response)
        if total > self.max_length:
            if self.truncation == "error":
                raise DataError(f'{where}: field "response": prompt + response is {total} tokens, '
                                f'over max_length={self.max_length} (truncation="error")')
            response = response[: self.max_length - len(prompt)]
        return TokenizedExample(tuple(prompt + response), len(prompt), example.source, images)


def tokenize_examples(examples: Iterable[Example], formatter: ChatFormatter) -> list[TokenizedExample]:
    """Tokenise every example once; the trainer keeps this list."""
    return [formatter.format(example) for example in examples]


def refusal_examples(harmful: list[Example], refusals: list[str], seed: int) -> list[Example]:
    """Pair each harmful request with a seeded random refusal (retain items: refusing stays)."""
    if not refusals:
        raise ValueError("refusals must not be empty")
    rng = random.Random(seed)
    # The tools stay offered: refusing is retained in the tool-use setting too.
    return [Example(response=rng.choice(refusals), request=ex.request, messages=ex.messages,
                    category="refusal", source=ex.source, id=f"{ex.id}-refusal" if ex.id else None,
                    tools=ex.tools, images=ex.images)
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
