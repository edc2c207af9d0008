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


# The attacks that show a behaviour's images to the model (the others set `takes_images = False`).
IMAGE_ATTACKS = ("direct", "prefilling", "templates", "base64", "rot13", "leetspeak", "translation", "typographic",
                 "image_pgd")


def refuse_images(attack: str, behaviors: Sequence[Behavior]) -> None:
    """ValueError naming `attack` and the first behaviour with images: for the attacks that work on the text
    prompt alone (token or embedding optimisation, activation steering, an attacker model that cannot see the
    image, forced tool calls), which would otherwise drop the image the request refers to and attack a
    different behaviour."""
    with_images = [b.id for b in behaviors if getattr(b, "images", ())]
    if with_images:
        more = f" (and {len(with_images) - 1} more)" if len(with_images) > 1 else ""
        raise ValueError(f"{attack}: behaviour {with_images[0]}{more} has images, which the {attack} attack cannot "
                         f"show the model (it attacks the text prompt only); attacks for image behaviours: "
                         f"{', '.join(IMAGE_ATTACKS)}")


def check_attacks_take_images(attacks: Sequence, behaviors: Sequence[Behavior]) -> None:
    """`refuse_images` for every attack (instance or class) with `takes_images = False`: before a run starts."""
    for attack in attacks:
        if getattr(attack, "takes_images", True) is False:
            refuse_images(attack.name, behaviors)


def budget_of(config) -> dict:
    """A config dataclass as a plain dict, for results.json."""
    return dataclasses.asdict(config)
