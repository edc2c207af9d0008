"""The training configuration: one flat dataclass, YAML recipes, `key=value` overrides.

Defaults are the reference's settings for Llama-3-8B-Instruct (docs/method.md section 5). Unknown keys
are rejected with the list of valid ones; values are type-checked against the field types.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_text

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


# Where `key=value` overrides come from, as errors name it (a recipe's own errors name the recipe file).
COMMAND_LINE = "command line (key=value)"
METHODS = ("rr", "repbend", "rr_lat", "refusal")
# The shortest max_length that holds a chat-formatted request and a response: even a bare ChatML prompt
# is ~8 tokens. Longer prompts are checked item by item when the data is tokenised.
MIN_MAX_LENGTH = 16


@dataclass(frozen=True)
class Bounds:
    """The valid range of a number: `low`/`high` inclusive unless `low_open`/`high_open`; never NaN or infinite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # shown after the range, e.g. what the value must leave room for

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, kind: type = float) -> str:
        noun = "an integer" if kind is int else "a number"
        if self.low is not None and self.high is not None:
            text = f"{noun} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None and kind is int and self.low_open:
            text = f"{noun} >= {int(self.low) + 1}"
        elif self.low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"{noun} {'<' if self.high_open else '<='} {self.high}"
        return f"{text} ({self.why})" if self.why else text


POSITIVE = Bounds(0, low_open=True)
NON_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)
PROBABILITY = Bounds(0, 1)


def _field(default, help: str, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class RRConfig:
    # ---- model
    model: str = _field("smollm2-135m", "hub id, local checkpoint directory, .gguf file, or smollm2-135m")
    blocks_path: str | None = _field(None, "attribute path of the decoder blocks for unknown architectures")
    chat_template: str | None = _field(None, "Jinja chat template for a tokenizer that has none")
    dtype: str = _field("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16")
    device: str = _field("auto", "auto, cpu, cuda, cuda:1, ...")
    # ---- data
    circuit_breaker_data: list[str] = _field(["builtin"], "circuit-breaker sets: builtin, builtin:NAME or file/dataset specs")
    retain_data: list[str] = _field(["builtin"], "retain sets: builtin, builtin:NAME (again to weight it up) or file/dataset specs")
    response_field: str | None = _field(None, "take responses from this field (e.g. llama3_output)")
    max_length: int = _field(1024, "longest tokenised item (prompt + response)")
    truncation: str = _field("response", "response: cut long responses at max_length; error: reject them")
    drop_instruction_prob: float = _field(0.0, "probability of replacing a request by an empty user turn")
    refusal_retain: bool = _field(True, "add harmful requests answered by refusals to the retain set")
    tool_format: str = _field(
        "template", "how examples with tools and tool calls are written: template (the chat template's own tool "
                    "support; an error if it has none) or json (tools listed in a system turn, each call a JSON "
                    "object in the assistant's text)")
    # ---- the method
    method: str = _field(
        "rr", "rr (Representation Rerouting, the paper), repbend (Representation Bending: the repbend_* "
              "settings), rr_lat (RR trained against a latent adversary: the lat_* settings) or refusal "
              "(refusal-only fine-tuning, the classic baseline: the refusal_*_weight settings)")
    # ---- RR (rr and rr_lat)
    target_layers: list[int] = _field([10, 20], "hidden-state entries the rerouting loss acts on (rr, rr_lat); LoRA "
                                                   "reaches the highest (every method)")
    alpha: float = _field(10.0, "loss-coefficient scale: 10 for Llama-3-8B, 5 for Mistral-7B")
    schedule_denominator: int | None = _field(None, "D in c_s = alpha(1 - t/D); default 2 * steps")
    retain_normalization: str = _field("reference", "reference (scaled to 1024-token padding) or masked_mean")
    reference_length: int = _field(1024, "padded length the reference normalisation assumes")
    retain_distance: str = _field("l2", "l2 (paper) or relative_l2 (divided by the original norm)")
    retain_weight: float = _field(1.0, "extra factor on c_r (1 = paper)")
    retain_response_weight: float = _field(
        1.0, "weight of a retain item's response tokens against its prompt tokens in L_r (1 = paper: all alike); "
             "above 1 where long shared prompts (tool definitions) would drown the responses")
    reroute_tokens: str = _field("all", "all non-pad tokens (paper) or response tokens only")
    seeded_start: str = _field(
        "none", "none (paper: LoRA B = 0, so the first steps follow rounding noise), target (the rerouting "
                "target moved by seeded_start_scale x its norm along a seeded direction per layer) or lora "
                "(LoRA B drawn from N(0, seeded_start_scale^2))")
    seeded_start_scale: float = _field(0.1, "size of the seeded start (see seeded_start)")
    # ---- RepBend (method: repbend; docs/method-notes.md). No schedule: the weights are constant.
    repbend_safe_weight: float = _field(0.5, "alpha: weight of the L2 distance to the original on safe (retain) "
                                             "text, every hidden-state entry")
    repbend_unsafe_weight: float = _field(0.1, "beta: weight of the L2 distance to the original on unsafe "
                                               "(circuit-breaker) text at repbend_unsafe_layers, maximised")
    repbend_cosine_weight: float = _field(0.3, "gamma: weight of the mean pairwise 1 - cos between unsafe "
                                               "items' states at their last prompt token")
    repbend_kl_weight: float = _field(0.3, "eps: weight of KL(original || trained) output distributions on "
                                           "safe text")
    repbend_kl_temperature: float = _field(2.0, "softmax temperature of the KL term (scaled back by its square)")
    repbend_refusal_weight: float = _field(
        0.0, "eta: weight of the distance between the trained states reading the harmful response and the "
             "original's reading a refusal to the same request (0: off, as in the public RepBend script)")
    repbend_refusal_tokens: int = _field(20, "positions from the last prompt token the refusal term compares")
    repbend_unsafe_layers: list[int] = _field(
        [], "hidden-state entries of the unsafe terms; [] = from 5/8 of the depth to the last entry before the "
            "final-norm one (Llama-3-8B: 20..31, the paper's 'layer 20 on')")
    # ---- RR with a latent adversary (method: rr_lat; docs/method-notes.md)
    lat_layers: list[int] = _field([8], "hidden-state entries the adversary perturbs (0 = the embeddings), "
                                        "each below max(target_layers)")
    lat_eps: float = _field(0.1, "radius of each token's L2 ball, relative to the norm of the clean state "
                                 "it is added to")
    lat_steps: int = _field(16, "PGD steps per circuit-breaker batch (a forward and backward each, and one more "
                                "forward to evaluate the last)")
    lat_step_size: float = _field(0.025, "length of each PGD step, relative to the clean state's norm like lat_eps")
    # ---- refusal-only fine-tuning (method: refusal; docs/method-notes.md). No schedule: the weights are constant.
    refusal_weight: float = _field(
        1.0, "weight of the cross-entropy of a refusal (one of the project's refusal styles) to each "
             "circuit-breaker request (method refusal)")
    refusal_retain_weight: float = _field(
        1.0, "weight of the cross-entropy of the retain items' own responses (method refusal; ordinary SFT "
             "on the model's own answers)")
    # ---- LoRA
    lora_r: int = _field(16, "LoRA rank")
    lora_alpha: int = _field(16, "LoRA alpha")
    lora_dropout: float = _field(0.05, "LoRA dropout")
    lora_target_modules: list[str] = _field(
        ["auto"], "module names LoRA wraps in blocks 0..max(target_layers) (repbend: of its unsafe layers); auto = "
        "the paper's q,k,v,o,gate,up,down projections where the model has them, else every linear layer; all-linear",
    )
    full_layers: bool = _field(False, "keep the blocks above max(target_layers) during training (repbend always "
                                      "keeps them: its KL term needs the logits)")
    # ---- optimisation
    steps: int = _field(150, "optimizer steps")
    batch_size: int = _field(16, "items per optimizer step from each set")
    grad_accum: int = _field(1, "micro-batches per optimizer step (batch_size must divide by it)")
    lr: float = _field(1e-4, "AdamW learning rate (at every step, or at the first under lr_schedule: linear)")
    lr_schedule: str = _field("constant", "constant (the paper's) or linear (from lr at step 1 down to lr/steps "
                                          "at the last, as Hugging Face's default scheduler)")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    max_grad_norm: float = _field(1.0, "gradient clipping")
    frozen_cache_gb: float = _field(2.0, "memory for caching the frozen model's hidden states per item; 0 = off")
    gradient_checkpointing: str = _field(
        "auto", "auto (GPU: per batch, as many blocks without checkpointing as activation_memory_gb allows; "
                "CPU: off), true (every block) or false")
    activation_memory_gb: float | None = _field(
        None, "GPU memory the grad pass's activations may use under auto checkpointing "
              "(default: 80% of the free memory after loading, less frozen_cache_gb)")
    joint_frozen_pass: bool = _field(False, "one adapter-disabled pass over both sets' batches instead of two")
    packing: bool = _field(
        False, "pack each batch's items end to end into rows of pack_length tokens (attention never crosses "
               "items; position ids restart per item) instead of padding every item to the longest (method rr; "
               "text models whose attention honours packed position_ids: eager, sdpa, flex_attention)")
    pack_length: int | None = _field(None, "tokens per packed row (packing: true); default max_length, at least "
                                           "max_length")
    compile_loss: bool = _field(False, "torch.compile the loss functions")
    seed: int = _field(42, "seed for data order, augmentation and LoRA init")
    log_every: int = _field(1, "train-log interval in steps")
    save_every: int = _field(50, "checkpoint (adapter, optimizer, RNG, data position) every N steps; 0 = off")
    keep_checkpoints: int = _field(2, "newest checkpoints kept under OUT/checkpoints")
    checkpoint_frozen_cache: bool = _field(True, "save the frozen-state cache with the checkpoints, so a resumed run "
                                                 "is exact; false: recomputed on resume (equal up to rounding)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_types(self)
        choices = {"method": METHODS,
                   "retain_normalization": ("reference", "masked_mean"), "retain_distance": ("l2", "relative_l2"),
                   "reroute_tokens": ("all", "response"), "seeded_start": ("none", "target", "lora"),
                   "truncation": ("response", "error"), "lr_schedule": ("constant", "linear"),
                   "tool_format": ("template", "json"),
                   "gradient_checkpointing": ("auto", "true", "false")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        hints = typing.get_type_hints(type(self))
        for key, bounds in RANGES.items():
            value = getattr(self, key)
            for item in value if isinstance(value, list) else [value]:
                if item is not None and not bounds.contains(item):
                    kind = int if int in (hints[key], *typing.get_args(hints[key])) else float
                    raise ConfigError(f"{key}: expected {bounds.describe(kind)}, got {value}")
        if not self.target_layers:
            raise ConfigError("target_layers: expected at least one hidden-state entry, got []")
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ConfigError(f"pack_length ({self.pack_length}) must be at least max_length ({self.max_length}): "
                              "every item must fit in one packed row")
        if self.packing and self.method != "rr":
            raise ConfigError(f"packing: supported for method rr only (method {self.method} reads per-row positions)")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        self._validate_method()

    def _validate_method(self) -> None:
        """The settings one method reads that the others ignore."""
        if self.method == "rr_lat":
            if not self.lat_layers:
                raise ConfigError("lat_layers: method rr_lat needs at least one hidden-state entry to perturb")
            if max(self.lat_layers) >= max(self.target_layers):
                raise ConfigError(f"lat_layers: each entry must be below max(target_layers) ({max(self.target_layers)}), "
                                  f"got {self.lat_layers}: a perturbation there cannot reach the rerouting loss")
        if self.method in ("repbend", "refusal") and self.seeded_start == "target":
            raise ConfigError(f"seeded_start: target moves the rerouting target of rr and rr_lat; method "
                              f"{self.method} has none (use none or lora)")
        if self.method == "refusal" and self.drop_instruction_prob > 0:
            raise ConfigError(f"drop_instruction_prob: method refusal trains each response as the answer to its "
                              f"request; with the request dropped ({self.drop_instruction_prob}) it would teach "
                              "refusing an empty turn (use 0)")

    @property
    def denominator(self) -> int:
        return self.schedule_denominator or 2 * self.steps

    @property
    def kept_blocks(self) -> int:
        """Blocks 0..max(target_layers) are trained; entry max(L) is the output of block max(L)-1."""
        return max(self.target_layers) + 1

    # ---------------------------------------------------------------- I/O

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> "RRConfig":
        """A YAML file's config with `overrides` on top: `key=value` strings (the command line's) or a mapping.
        The file is checked on its own first, so that each error names where its value came from."""
        values: dict[str, Any] = {}
        if path is not None:
            values = read_yaml(path)
            config = cls.from_dict(values, where=str(path))
            if not overrides:
                return config
        if isinstance(overrides, dict):
            return cls.from_dict({**values, **overrides}, where="overrides")
        return cls.from_dict({**values, **parse_overrides(overrides or [])}, where=COMMAND_LINE)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "RRConfig":
        return dataclass_from_dict(cls, values, where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"  {f.name} = {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
                         f"  # {f.metadata['help']}" for f in dataclasses.fields(cls))


# The valid range of every numeric field (tests/test_config.py checks that none is missing).
RANGES: dict[str, Bounds] = {
    "max_length": Bounds(MIN_MAX_LENGTH, why="room for a chat-formatted request and a response"),
    "drop_instruction_prob": PROBABILITY,
    "target_layers": Bounds(1, why="hidden-state entries; 0 is the embeddings"),
    "alpha": POSITIVE, "schedule_denominator": POSITIVE, "reference_length": POSITIVE,
    "retain_weight": NON_NEGATIVE, "retain_response_weight": NON_NEGATIVE, "seeded_start_scale": POSITIVE,
    "lora_r": POSITIVE, "lora_alpha": POSITIVE, "lora_dropout": Bounds(0, 1, high_open=True),
    "steps": POSITIVE, "batch_size": POSITIVE, "grad_accum": POSITIVE, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
    "max_grad_norm": POSITIVE, "frozen_cache_gb": Bounds(0, why="0 = off"), "activation_memory_gb": POSITIVE,
    "seed": Bounds(0, 2**32 - 1), "log_every": POSITIVE, "save_every": Bounds(0, why="0 = off"),
    "keep_checkpoints": AT_LEAST_ONE,
    "pack_length": Bounds(MIN_MAX_LENGTH, why="at least max_length: every item fits in one row"),
    "repbend_safe_weight": NON_NEGATIVE, "repbend_unsafe_weight": NON_NEGATIVE, "repbend_cosine_weight": NON_NEGATIVE,
    "repbend_kl_weight": NON_NEGATIVE, "repbend_kl_temperature": POSITIVE, "repbend_refusal_weight": NON_NEGATIVE,
    "repbend_refusal_tokens": AT_LEAST_ONE,
    "repbend_unsafe_layers": Bounds(1, why="hidden-state entries; 0 is the embeddings"),
    "lat_layers": Bounds(0, why="hidden-state entries; 0 is the embeddings"), "lat_eps": POSITIVE,
    "lat_steps": AT_LEAST_ONE, "lat_step_size": POSITIVE,
    "refusal_weight": NON_NEGATIVE, "refusal_retain_weight": NON_NEGATIVE,
}


def bounded(kind: type, bounds: Bounds):
    """An argparse `type`: a `kind` (int or float) within `bounds`, so that `--limit 0` fails before anything loads."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bounds.describe(kind)}, got {text!r}") from None
        if not bounds.contains(value):
            raise argparse.ArgumentTypeError(f"expected {bounds.describe(kind)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def shipped_names(directory: Path) -> list[str]:
    """The names of the YAML files shipped in `directory` (recipes, eval configs, accelerate configs)."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def shipped_yaml(name_or_path: str, directory: Path, option: str, what: str) -> Path:
    """A YAML file given by path, or by the name of one shipped in `directory` (`what`: a recipe, an eval
    config, an accelerate config); `option` names the command-line option in errors."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{option} {name_or_path}: no such file")
        return path
    shipped = directory / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(shipped_names(directory))
        raise ConfigError(f"{option} {name_or_path}: no such file, and no shipped {what} of that name ({names})")
    return shipped


def recipe_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a recipe shipped in the package (`llama3-8b`, `smollm2-135m`, ...)."""
    return shipped_yaml(name_or_path, RECIPES_DIR, "--config", "recipe")


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings; values are parsed as YAML (`lr=1e-3`, `target_layers=[8,16]`)."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{COMMAND_LINE}: {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        values[key.strip()] = value
    return values


def dataclass_from_dict(cls, values: dict, where: str):
    """A config dataclass from a mapping; unknown keys and bad values raise ConfigError naming `where`."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def check_types(config) -> None:
    """Coerce every field of a config dataclass to its annotated type, or raise naming the field."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = hints[f.name]
        coerced = coerce(value, expected)
        if coerced is INVALID:
            raise ConfigError(f"{f.name}: expected {type_name(expected)}, got {value!r}")
        setattr(config, f.name, coerced)


INVALID = object()  # what `coerce` returns for a value that is not of the expected type


def coerce(value, expected):
    """`value` as the annotated type `expected` (YAML's and key=value's spellings accepted), or INVALID."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(expected):
            return None
        for option in typing.get_args(expected):
            if option is not type(None) and (result := coerce(value, option)) is not INVALID:
                return result
        return INVALID
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, (list, tuple)):
            value = [value]  # `target_layers=12` means [12]
        items = [coerce(v, item_type) for v in value]
        return INVALID if any(i is INVALID for i in items) else items
    if expected is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"  # never bool("False") == True
        return value if isinstance(value, bool) else INVALID
    if expected is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return INVALID
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else INVALID
    if expected is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else INVALID
    if expected is str:
        # YAML reads `gradient_checkpointing=true` as a bool; the field is a string choice.
        return str(value).lower() if isinstance(value, bool) else (value if isinstance(value, str) else INVALID)
    return value


def type_name(expected) -> str:
    if typing.get_origin(expected) is not None:  # list[int], int | None: say what the items must be
        return str(expected).replace("typing.", "")
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
