"""Forced function call (the paper's Section 4.3 / method.md 9): the API forces the assistant turn to be a
tool call. With local weights: the prompt rendered with the behaviour's tools, the assistant turn prefilled
with the opening of a call in the model's OWN format (`tools.forcing.call_opening`), greedy continuation.

`name_the_tool` also prefills the harmful tool's name (and the arguments' opening), as an API's
``tool_choice`` naming one function would; by default only the call is forced and the model picks the tool.
The generation RETURNED is the call opening followed by the continuation, and it is judged whole: the
opening is the API's call format, not an attacker's words, and a call cut at its opening does not parse
(so, unlike prefilling's `extra["prefill"]`, the opening is `extra["call_opening"]`, which the harness leaves
in); `extra["continuation"]` is the model's own part. Greedy generation runs on the torch
model (the prompt is exact token ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..generation import chat_prompt
from ..tools.forcing import call_opening
from ._common import conversation, encode, generate_from_ids
from .base import AttackOutput, Behavior, budget_of, refuse_images


@dataclass
class ForcedCallConfig:
    """One greedy continuation of a forced call opening per behaviour."""

    max_new_tokens: int = 256
    batch_size: int = 16
    name_the_tool: bool = False  # prefill the behaviour's harmful_call name too (tool_choice naming it)
    system_prompt: str | None = None


class ForcedCall:
    name = "forced_call"
    takes_images = False  # a prompt with both tools and images is not rendered
    config_class = ForcedCallConfig

    def __init__(self, config: ForcedCallConfig | None = None):
        self.config = config or ForcedCallConfig()

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        refuse_images(self.name, behaviors)
        cfg = self.config
        openings, prompts = [], []
        for b in behaviors:
            opening = call_opening(tokenizer, b.tools, name=self._forced_name(b))
            openings.append(opening)
            prompts.append(chat_prompt(tokenizer, conversation(b.user_message(), cfg.system_prompt), opening, b.tools))
        continuations = generate_from_ids(model, tokenizer, [encode(tokenizer, p) for p in prompts],
                                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        return [AttackOutput(behavior_id=b.id, attack=self.name, prompt=b.user_message(), generations=[o + g],
                             budget=budget_of(cfg),
                             extra={"call_opening": o, "continuation": g, "prompt_text": p,
                                    "forced_tool": self._forced_name(b)})
                for b, o, p, g in zip(behaviors, openings, prompts, continuations)]

    def _forced_name(self, behavior: Behavior) -> str | None:
        if not behavior.tools:
            raise ValueError(f"forced_call: behaviour {behavior.id} has no tools; the attack forces a tool call "
                             f"and needs the behaviour's tool definitions")
        if not self.config.name_the_tool:
            return None
        if not behavior.harmful_call:
            raise ValueError(f"forced_call: name_the_tool needs the behaviour's harmful_call, and {behavior.id} "
                             f"has none")
        return behavior.harmful_call["name"]
