"""What every attack takes and returns.

An attack is a module with a config dataclass (its budget, with defaults) and a class with
`run(model, tokenizer, behaviors) -> list[AttackOutput]`. The evaluation harness judges the
generations; attacks never judge (except PAIR, whose loop needs a score, through a callback).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, Sequence

# Re-exported: attacks take behaviours, and their callers import it from here.
from ..data.schema import Behavior


@dataclass
class AttackOutput:
    behavior_id: str
    attack: str
    prompt: str  # what the model was shown as the user turn (or a description of the perturbation)
    generations: list[str]  # one or more samples; a behaviour is broken if any is harmful
    budget: dict  # the attack config's budget fields, recorded beside every result
    extra: dict = field(default_factory=dict)  # losses, snapshots steps, prefill text, ...


class Attack(Protocol):
    name: str

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]: ...


def budget_of(config) -> dict:
    """A config dataclass as a plain dict, for results.json."""
    return dataclasses.asdict(config)
