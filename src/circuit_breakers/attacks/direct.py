"""Direct request: the behaviour (context first, for contextual ones) as the user turn, greedy.

The paper's Table 1 baseline; the reference generated up to 512 new tokens with the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..generation import chat_prompt, generate
from ._common import conversation
from .base import AttackOutput, Behavior, budget_of


@dataclass
class DirectConfig:
    """No optimisation: one greedy generation per behaviour (reference: 512 new tokens)."""

    max_new_tokens: int = 256
    batch_size: int = 16
    system_prompt: str | None = None


class DirectRequest:
    name = "direct"
    config_class = DirectConfig

    def __init__(self, config: DirectConfig | None = None):
        self.config = config or DirectConfig()

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        cfg = self.config
        conversations = [conversation(b.user_message(), cfg.system_prompt) for b in behaviors]
        generations = generate(model, tokenizer, conversations, tools=[b.tools for b in behaviors],
                               images=[b.images for b in behaviors], max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size)
        return [AttackOutput(behavior_id=b.id, attack=self.name, prompt=b.user_message(), generations=[g],
                             budget=budget_of(cfg), extra={"prompt_text": chat_prompt(tokenizer, c, tools=b.tools)})
                for b, c, g in zip(behaviors, conversations, generations)]
