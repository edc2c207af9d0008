"""One evaluation run, as `circuit-breakers eval` and the demo both do it.

`run_evaluation(model, tokenizer, config, out_dir, baseline=...)`: the attacks at their per-attack budgets
(evaluation/harness.py), judged; over-refusal and benign agreement (capability.py), and for tool-use or
image behaviours (or a vision-language model) benign tool calling or image questions too; the representation
cosines (diagnostics.py); the judges' agreement with hand labels when given (agreement.py); and
OUT/results.json, OUT/samples.jsonl, OUT/report.md and OUT/report.html.

The budget is an `EvalConfig`: a YAML file, or a shipped one by name (evaluation/configs/: `quick`, the
demo's; `paper`, the published settings), with `--attack NAME.FIELD=VALUE` overrides on top:

    config = load_eval_config("quick").with_attack_overrides(["gcg.num_steps=50"])
    results = run_evaluation(model, tokenizer, config, "runs/eval", baseline=(original, tokenizer))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import (INVALID, ConfigError, check_types, coerce, dataclass_from_dict, parse_overrides, read_yaml,
                      shipped_names, shipped_yaml, type_name)

CONFIGS_DIR = Path(__file__).parent / "configs"
# The judges that take the original model as perplexity reference and can label answers to benign prompts:
# they label over-refusal too; the others (keyword matching, a harmful-behaviour classifier) leave it to
# the heuristic judge.
BENIGN_LABELLING_JUDGES = ("heuristic", "fitted")


@dataclass
class EvalConfig:
    """What an evaluation runs and how hard it tries. Every key of an eval config YAML is a field here."""

    # attack registry name -> that attack's config fields (the others keep their defaults); run in this order
    attacks: dict = field(default_factory=lambda: {"direct": {}})
    behaviors: int | None = None  # N behaviours (None: all), chosen as `select` says
    # how `behaviors` and `capability_prompts` cut a list: first (the first N) or spread (N taken in turn from
    # each category, so that a subset of a file sorted by category covers them all); behaviors.select
    select: str = "first"
    # attacks that get only the first `optimised_behaviors` behaviours and, unless optimised_on_original,
    # run on the evaluated model alone (optimisation attacks cost seconds to hours per behaviour)
    optimised_attacks: list[str] = field(default_factory=list)
    optimised_behaviors: int | None = None  # None: as many as the other attacks
    optimised_on_original: bool = True
    # generation length of every attack whose config has max_new_tokens (an attack's own setting wins) and of
    # the capability answers; None: each attack's default, 64 for capability
    max_new_tokens: int | None = None
    judge: str = "heuristic"  # refusal, heuristic, fitted, harmbench or llm
    judge_model: str | None = None  # harmbench: classifier path or URL[#MODEL]; llm: URL[#MODEL]; fitted: params file
    judge_full_turn: bool = False  # judge the whole assistant turn, prefill included (default: the continuation)
    capability: bool = True  # over-refusal, benign agreement, perplexity (lm-eval tasks; tool calls, image questions)
    capability_prompts: int | None = None  # benign and borderline test prompts each (None: all)
    # the plain-text benign and borderline prompts (over-refusal, agreement, perplexity); tool-call and image
    # capability are measured for tool-use and image behaviours either way
    text_capability: bool = True
    lm_eval_tasks: list[str] | None = None  # lm-evaluation-harness tasks (needs lm_eval and a model directory)
    # a system prompt for every attack (unless the attack sets its own) and every capability prompt, for both
    # models: the safety-prompt baseline (compare's "safety-prompt" row, SAFETY_PROMPT)
    system_prompt: str | None = None
    # memory for the prompt KV caches a model's later attacks reuse (the forced call's and prefilling's prompts
    # extend the direct request's: only their new tokens are prefilled); 0 = off (every prompt prefilled whole)
    prompt_cache_gb: float = 1.0
    diagnostics: bool = True  # representation cosines against the baseline
    diagnostics_items: int | None = None  # held-out harmful and benign items each (None: all)
    seed: int = 0

    def __post_init__(self) -> None:
        from ..attacks import ATTACKS
        from ..judges import JUDGES
        from .behaviors import SELECTIONS

        check_types(self)
        if not isinstance(self.attacks, dict) or not self.attacks:
            raise ConfigError(f"attacks: expected a mapping of attack names to their settings, got {self.attacks!r}")
        checked = {}
        for name, settings in self.attacks.items():
            try:
                checked[name] = attack_settings(name, {} if settings is None else settings)
            except ConfigError as err:
                raise ConfigError(f"attacks: {err}") from None
        self.attacks = checked
        unknown = [name for name in self.optimised_attacks if name not in ATTACKS]
        if unknown:
            raise ConfigError(f"optimised_attacks: unknown attack(s) {', '.join(unknown)}; valid attacks: "
                              f"{', '.join(ATTACKS)}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"select: expected one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.judge not in JUDGES:
            raise ConfigError(f"judge: expected one of {', '.join(JUDGES)}, got {self.judge!r}")
        for key in ("behaviors", "optimised_behaviors", "max_new_tokens", "capability_prompts", "diagnostics_items"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: expected a positive integer or null, got {value}")
        if self.prompt_cache_gb < 0:
            raise ConfigError(f"prompt_cache_gb: expected 0 (off) or a positive number of GiB, "
                              f"got {self.prompt_cache_gb}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "eval config") -> "EvalConfig":
        return dataclass_from_dict(cls, values, where)

    def to_dict(self) -> dict:
        """Plain JSON values (tuples as lists): what results.json records."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_attack_overrides(self, items: Sequence[str]) -> "EvalConfig":
        """This config with `NAME.FIELD=VALUE` settings on top (the command line's `--attack`); values are
        parsed as YAML, as train's key=value overrides are (`templates.names=[prefix_injection]`)."""
        from ..attacks import ATTACKS

        attacks = {name: dict(settings) for name, settings in self.attacks.items()}
        for item in items:
            where = f"--attack {item}"
            name, dot, assignment = item.partition(".")
            if not dot or "=" not in assignment or not assignment.partition("=")[0]:
                raise ConfigError(f"{where}: expected ATTACK.FIELD=VALUE, e.g. gcg.num_steps=50")
            if name not in ATTACKS:
                raise ConfigError(f"{where}: unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
            if name not in attacks:
                raise ConfigError(f"{where}: {name} is not among this run's attacks ({', '.join(attacks)}); "
                                  "add it with --attacks or to the eval config's attacks")
            try:
                attacks[name].update(attack_settings(name, parse_overrides([assignment])))
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        return dataclasses.replace(self, attacks=attacks)

    def make_attacks(self) -> list:
        """The attacks, each with its settings, and `max_new_tokens` and `system_prompt` where its config has the
        field and does not set it."""
        from ..attacks import config_fields, make_attack

        attacks = []
        for name, settings in self.attacks.items():
            options = dict(settings)
            for key in ("max_new_tokens", "system_prompt"):
                if getattr(self, key) is not None and key in config_fields(name):
                    options.setdefault(key, getattr(self, key))
            attack = make_attack(name, **options)
            # an attack with one result per setting (finetune: per N) is scored as one attack per part
            attacks.extend(attack.split() if hasattr(attack, "split") else [attack])
        return attacks


def attack_settings(name: str, settings: dict) -> dict:
    """`settings` for attack `name`, checked against its config dataclass: known fields, values of the field's
    type (coerced as RRConfig's are; a tuple field takes a list). Raises ConfigError naming the field."""
    from ..attacks import ATTACKS, make_attack

    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    if not isinstance(settings, dict):
        raise ConfigError(f"{name}: expected a mapping of its config fields, got {settings!r}")
    hints = typing.get_type_hints(ATTACKS[name].config_class)
    valid = [f.name for f in dataclasses.fields(ATTACKS[name].config_class)]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {', '.join(unknown)}; valid fields of {name}: {', '.join(valid)}")
    checked = {}
    for key, value in settings.items():
        checked[key] = coerce(value, _tuples_as_lists(hints[key]))
        if checked[key] is INVALID:
            raise ConfigError(f"{name}.{key}: expected {type_name(hints[key])}, got {value!r}")
    try:
        make_attack(name, **checked)  # the attack's own checks (an optimizer's name, ...)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name}: {err}") from None
    return checked


def _tuples_as_lists(expected):
    """tuple[X, ...] as list[X], inside unions too: YAML has lists, and make_attack turns them into tuples."""
    origin = typing.get_origin(expected)
    if origin is tuple:
        return list[typing.get_args(expected)[0]]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_tuples_as_lists(a) for a in typing.get_args(expected))]
    return expected


def eval_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of an eval config shipped in the package (`quick`, `paper`)."""
    return shipped_yaml(name_or_path, CONFIGS_DIR, "--eval-config", "eval config")


def shipped_eval_configs() -> list[str]:
    return shipped_names(CONFIGS_DIR)


def load_eval_config(name_or_path: str) -> EvalConfig:
    """An eval config from a YAML file or a shipped name; errors name the file and the key."""
    path = eval_config_path(name_or_path)
    return EvalConfig.from_dict(read_yaml(path), where=str(path))


# ---------------------------------------------------------------- the run


def _file_digest(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None


def _previous_results(out: Path) -> dict:
    from .harness import RESULTS_FILE

    try:
        return json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # none yet, or a broken one: nothing to reuse
        return {}


def _models_of(state: dict) -> dict:
    """A resume state without its labels: the attacks, capability and diagnostics do not depend on them."""
    return {k: v for k, v in state.items() if k not in ("labels", "labels_sha256")}


def _same_vocab(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def run_evaluation(model, tokenizer, config: EvalConfig, out_dir: str | Path, *, baseline: tuple | None = None,
                   behaviors: Sequence | None = None, labels: str | Path | None = None,
                   labels_skipped: str | None = None, target_layers: Sequence[int] | None = None,
                   max_length: int = 512, model_dir: str | None = None, baseline_dir: str | None = None,
                   run_info: dict | None = None, title: str = "Circuit-breakers evaluation", resume: bool = True,
                   state: dict | None = None, shard: tuple[int, int] = (0, 1), progress: bool = True) -> dict | None:
    """Evaluate `model` ("model", after) and `baseline` ((model, tokenizer) of the original: "baseline", before)
    under `config` into `out_dir`; returns the results written to OUT/results.json.

    `behaviors`: the behaviours (default: the built-in harmful test split), cut to `config.behaviors`.
    `labels`: hand-labelled outputs for judge agreement (every judge on the part the run's fitted judge was not
    fitted on); without them `labels_skipped`, when given, is recorded as the reason. `target_layers` and
    `max_length` go to the diagnostics, `model_dir` and `baseline_dir` to lm-eval, `run_info` into results.json
    as "run". `resume`: keep the finished attacks of OUT/samples.jsonl. `state` (what identifies the models,
    e.g. their files): recorded; a rerun resumes only when results.json records the same state and eval config
    (else OUT starts again), and then reuses its capability and diagnostics, and its judge agreement while the
    labels file is unchanged. `shard` (rank, world): under a launcher the behaviours are shared out over the
    processes (sharding.py); rank 0 does the rest alone and the others return None.
    """
    from ..judges import make_judge
    from ..models import is_multimodal
    from ..reports import write_report
    from .behaviors import load_behaviors, select
    from .harness import write_results

    out = Path(out_dir)
    started = clock = time.time()
    timings: dict[str, float] = {}

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.time() - clock, 1)
        clock = time.time()

    labels = Path(labels) if labels else None
    previous = _previous_results(out)
    reuse: dict = {}
    if state is not None:
        state = {**state, "labels": str(labels) if labels else None, "labels_sha256": _file_digest(labels)}
        prior = previous.get("resume_state") or {}
        resume = resume and previous.get("eval_config") == config.to_dict() and _models_of(prior) == _models_of(state)
        reuse = previous if resume else {}
        if resume:
            print(f"evaluation: resuming in {out} (same model and budget); finished work is skipped")
    extra = {"run": run_info or {}, "eval_config": config.to_dict()}
    if state is not None:
        extra["resume_state"] = state

    reference = baseline if baseline is not None else (model, tokenizer)  # the perplexity judges' original model
    judge = make_judge(config.judge, config.judge_model,
                       reference=reference if config.judge in BENIGN_LABELLING_JUDGES else None)
    behaviors = select(load_behaviors(None) if behaviors is None else behaviors, config.behaviors, config.select)
    results = _attack(model, tokenizer, baseline, behaviors, judge, out, config, resume=resume, extra=extra,
                      shard=shard, progress=progress)
    if results is None:
        return None
    lap("attacks")

    comparable = baseline is not None and _same_vocab(tokenizer, baseline[1])
    if config.capability:  # else no "capability" key: the report says it was not measured
        from .capability import capability_report

        if config.text_capability:
            results["capability"] = reuse.get("capability") or capability_report(
                model, tokenizer, baseline[0] if comparable else None, limit=config.capability_prompts,
                max_new_tokens=config.max_new_tokens or 64, progress=progress, model_dir=model_dir,
                baseline_dir=baseline_dir, lm_eval_tasks=config.lm_eval_tasks, system_prompt=config.system_prompt,
                samples_out=out / "capability_samples.jsonl",
                judge=judge if config.judge in BENIGN_LABELLING_JUDGES else None)
        if any(b.tools for b in behaviors):  # tool-use behaviours: is calling tools for benign requests kept?
            results["tool_capability"] = reuse.get("tool_capability") or _tool_capability(
                model, tokenizer, baseline[0] if comparable else None, config)
        if any(b.images for b in behaviors) or is_multimodal(model):  # are image questions still answered?
            results["image_capability"] = reuse.get("image_capability") or _image_capability(
                model, tokenizer, baseline[0] if comparable else None, config)
    lap("capability")

    if not config.diagnostics:
        results["diagnostics"] = {"skipped": "--no-diagnostics (diagnostics: false)"}
    elif not comparable:
        results["diagnostics"] = {"skipped": "needs --baseline with the same tokenizer"}
    elif reuse.get("diagnostics"):
        results["diagnostics"] = reuse["diagnostics"]
    else:
        from .diagnostics import representation_report

        results["diagnostics"] = representation_report(model, baseline[0], tokenizer, max_length=max_length,
                                                       limit=config.diagnostics_items)
        if target_layers:
            results["diagnostics"]["target_layers"] = list(target_layers)
    lap("diagnostics")

    if labels is None:
        if labels_skipped:
            results["judge_agreement_skipped"] = labels_skipped
    elif reuse.get("judge_agreement") and reuse.get("resume_state") == state:
        for key in ("judge_agreement", "judge_agreement_heldout_only", "judge_agreement_labels"):
            if key in reuse:
                results[key] = reuse[key]
    else:
        from .agreement import judge_agreement, load_labelled
        from .judge_fit import fitted_on

        judges = {"refusal": make_judge("refusal"), "heuristic": make_judge("heuristic", reference=reference),
                  judge.name: judge}
        items = load_labelled(labels)
        fit_ids = fitted_on(judge.params, items) if hasattr(judge, "params") else set()
        results["judge_agreement"] = judge_agreement([i for i in items if i.id not in fit_ids], judges)
        results["judge_agreement_heldout_only"] = bool(fit_ids)
        results["judge_agreement_labels"] = str(labels)
    lap("judge_agreement")

    write_report(results, out, title=title)
    lap("report")
    results["seconds"] = round(time.time() - started, 1)
    results["stage_seconds"] = timings  # this run's stages (a resumed run skips finished work)
    results["resumed"] = bool(resume and previous)
    write_results(out, results)
    return results


def _tool_capability(model, tokenizer, baseline_model, config: EvalConfig) -> dict:
    """Benign call accuracy (BFCL-style AST match) on the built-in benign tool-use test cases with expected calls
    (not those answered in text), before and after."""
    from ..data.builtin import builtin_tool_set
    from .behaviors import select
    from .tool_capability import tool_capability_report

    cases = select([c for c in builtin_tool_set("benign", "test") if c.tool_calls], config.capability_prompts,
                   config.select)
    report = tool_capability_report(model, tokenizer, cases, baseline_model, max_new_tokens=config.max_new_tokens or 128,
                                    system_prompt=config.system_prompt)
    return {**report, "source": "builtin_tool_set('benign', 'test'), the cases with expected calls"}


def _image_capability(model, processor, baseline_model, config: EvalConfig) -> dict:
    """Accuracy on the built-in benign image test questions and agreement with the original's answers, before and
    after (the paper's MMMU / LLaVA-Wild check, at this project's size)."""
    from .image_capability import image_capability_report

    report = image_capability_report(model, processor, baseline_model, limit=config.capability_prompts,
                                     max_new_tokens=config.max_new_tokens or 32)
    return {**report, "source": "builtin_multimodal_set('benign', 'test')"}


def _attack(model, tokenizer, baseline, behaviors: list, judge, out: Path, config: EvalConfig, *, resume: bool,
            extra: dict, shard: tuple[int, int], progress: bool) -> dict | None:
    """Every attack through the harness into OUT/samples.jsonl, then one score of them all (None on ranks > 0).

    The optimisation attacks of a small budget run in a second harness call, on fewer behaviours and perhaps
    without the baseline; both calls write the same samples.jsonl, and `build_results` scores each attack on
    its own behaviours and models."""
    from .harness import BASELINE_NAME, MODEL_NAME, SAMPLES_FILE, build_results, evaluate, read_samples
    from .sharding import evaluate_sharded

    rank, world = shard
    attacks = config.make_attacks()
    for attack in attacks:  # finetune: no behaviour of the run may be among the attacker's training pairs
        if hasattr(attack, "exclude"):
            attack.exclude(behaviors)
    few = behaviors[:config.optimised_behaviors]
    optimised = [a for a in attacks if getattr(a, "family", a.name) in config.optimised_attacks]
    groups = [(behaviors, [a for a in attacks if a not in optimised], True),
              (few, optimised, config.optimised_on_original)]
    for i, (group_behaviors, group, on_baseline) in enumerate([g for g in groups if g[0] and g[1]]):
        options = dict(baseline=baseline if on_baseline else None, seed=config.seed, resume=resume or i > 0,
                       progress=progress, extra=extra, judge_full_turn=config.judge_full_turn,
                       prompt_cache_gb=config.prompt_cache_gb)
        if world > 1:
            evaluate_sharded(model, tokenizer, group_behaviors, group, judge, out, rank=rank, world=world, **options)
        else:
            evaluate(model, tokenizer, group_behaviors, group, judge, out, **options)
    if rank != 0:
        return None
    models = [MODEL_NAME] + ([BASELINE_NAME] if baseline is not None else [])
    results = build_results(
        read_samples(out / SAMPLES_FILE), behaviors, attacks, judge, seed=config.seed, models=models,
        attack_behaviors={a.name: few for a in optimised},
        attack_models={} if config.optimised_on_original else {a.name: [MODEL_NAME] for a in optimised})
    if world > 1:
        results["shards"] = world
    results.update(extra)
    return results
