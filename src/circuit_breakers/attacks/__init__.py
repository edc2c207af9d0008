"""Jailbreak attacks for evaluating a (circuit-broken) model, and their registry.

Every attack is a class with `name`, `config_class` (a flat dataclass of its budget, with
defaults) and `run(model, tokenizer, behaviors) -> list[AttackOutput]`; every AttackOutput carries
its config as `budget`. Build one by name with budget overrides::

    attack = make_attack("gcg", num_steps=500, search_width=512)
    outputs = attack.run(model, tokenizer, behaviors)

Keyword arguments that are not config fields go to the class's constructor (PAIR's `attacker` and
`score_fn`, GCG's `candidate_hook`); anything else is rejected.
"""

from __future__ import annotations

import dataclasses

from .base import Attack, AttackOutput, Behavior, budget_of
from .direct import DirectConfig, DirectRequest
from .embedding import (EmbeddingAttack, EmbeddingAttackConfig, ImprovedEmbeddingAttack,
                        ImprovedEmbeddingAttackConfig)
from .finetune import FineTune, FineTuneBenign, FineTuneBenignConfig, FineTuneConfig
from .forced_call import ForcedCall, ForcedCallConfig
from .gcg import GCG, GCGConfig, GCGResult
from .image_pgd import ImagePGD, ImagePGDConfig
from .pair import PAIR, EndpointAttacker, LocalAttacker, PairConfig
from .prefilling import Prefilling, PrefillingConfig
from .refusal_direction import (RefusalAblation, RefusalAblationConfig, RefusalAddition, RefusalAdditionConfig,
                                upper_middle_layers)
from .templates import Templates, TemplatesConfig, fill_template, load_templates
from .typographic import Typographic, TypographicConfig
from .transforms import (Base64Attack, Base64Config, LeetspeakAttack, LeetspeakConfig, Rot13Attack, Rot13Config,
                         TranslationAttack, TranslationConfig)

ATTACKS: dict[str, type] = {cls.name: cls for cls in (
    DirectRequest, Prefilling, Templates, EmbeddingAttack, ImprovedEmbeddingAttack, GCG, RefusalAblation,
    RefusalAddition, Base64Attack, Rot13Attack, LeetspeakAttack, TranslationAttack, PAIR, ForcedCall, ImagePGD,
    Typographic, FineTune, FineTuneBenign,
)}


def config_fields(name: str) -> dict[str, object]:
    """{field: default} of an attack's config."""
    cls = _attack_class(name)
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls.config_class)}


def _attack_class(name: str) -> type:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}") from None


def make_attack(name: str, **overrides):
    """An attack by registry name, its config built from the defaults and `overrides`.

    Overrides that name config fields set them (lists become tuples where the default is a tuple or
    None-or-tuple field); the rest are passed to the constructor, which rejects unknown names.
    """
    cls = _attack_class(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    config_kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if k in fields}
    others = {k: v for k, v in overrides.items() if k not in fields}
    config = cls.config_class(**config_kwargs)
    try:
        return cls(config, **others)
    except TypeError as err:
        raise ValueError(f"{name}: unknown option(s) {sorted(others)}; config fields are {sorted(fields)} "
                         f"({err})") from None


__all__ = [
    "ATTACKS", "Attack", "AttackOutput", "Base64Attack", "Base64Config", "Behavior", "DirectConfig", "DirectRequest",
    "EmbeddingAttack", "EmbeddingAttackConfig", "EndpointAttacker", "FineTune", "FineTuneBenign",
    "FineTuneBenignConfig", "FineTuneConfig", "ForcedCall", "ForcedCallConfig",
    "GCG", "GCGConfig", "GCGResult", "ImagePGD", "ImagePGDConfig",
    "ImprovedEmbeddingAttack", "ImprovedEmbeddingAttackConfig", "LeetspeakAttack", "LeetspeakConfig",
    "LocalAttacker", "PAIR", "PairConfig", "Prefilling", "PrefillingConfig", "RefusalAblation",
    "RefusalAblationConfig", "RefusalAddition", "RefusalAdditionConfig", "Rot13Attack", "Rot13Config", "Templates",
    "TemplatesConfig", "TranslationAttack", "Typographic", "TypographicConfig", "TranslationConfig", "budget_of", "config_fields", "fill_template",
    "load_templates", "make_attack", "upper_middle_layers",
]
