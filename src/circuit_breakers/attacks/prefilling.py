"""Prefilling: the assistant turn starts with the behaviour's target, the model continues it.

The paper's setting (Table 1, "Prefilling"): `target + ":\\n\\n"` right after the assistant header,
then greedy generation continues. The generation RETURNED is the prefill followed by the
continuation, so a judge reads the whole assistant turn as the model would have emitted it; the
prefill alone is in `extra["prefill"]` and the continuation alone in `extra["continuation"]`.
A judge that should not credit the attacker's own words can use the continuation instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..generation import chat_prompt, generate
from ._common import DEFAULT_TARGET, conversation, target_of
from .base import AttackOutput, Behavior, budget_of


@dataclass
class PrefillingConfig:
    """One greedy continuation of `target + suffix` per behaviour (reference: 512 new tokens)."""

    max_new_tokens: int = 256
    suffix: str = ":\n\n"  # appended to the target (the paper's ":\n\n")
    batch_size: int = 16
    fallback_target: str = DEFAULT_TARGET  # used (and recorded) for a behaviour without a target
    system_prompt: str | None = None


class Prefilling:
    name = "prefilling"
    config_class = PrefillingConfig

    def __init__(self, config: PrefillingConfig | None = None):
        self.config = config or PrefillingConfig()

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        cfg = self.config
        conversations = [conversation(b.user_message(), cfg.system_prompt) for b in behaviors]
        targets = [target_of(b, cfg.fallback_target) for b in behaviors]
        prefills = [t + cfg.suffix for t, _ in targets]
        continuations = generate(model, tokenizer, conversations, prefills=prefills, tools=[b.tools for b in behaviors],
                                 images=[b.images for b in behaviors], max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size)
        return [AttackOutput(behavior_id=b.id, attack=self.name, prompt=b.user_message(),
                             generations=[p + g], budget=budget_of(cfg),
                             extra={"prefill": p, "continuation": g, "target_fallback": fallback,
                                    "prompt_text": chat_prompt(tokenizer, c, p, b.tools)})
                for b, c, p, (_, fallback), g in zip(behaviors, conversations, prefills, targets, continuations)]
