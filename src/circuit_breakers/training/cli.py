"""`circuit-breakers train`: circuit-break a model, in this process or re-executed under `accelerate launch`.

    circuit-breakers train --config smollm2-135m --out runs/rr steps=150
    circuit-breakers train --resume runs/rr
    circuit-breakers train --accelerate-config multi-gpu --num-processes 4 --config llama3-8b --out runs/rr
    circuit-breakers train --teach-tools --model smollm2-135m --out runs/smollm2-tools steps=20

`--teach-tools` is the step before a tool-use circuit breaker on a model that does not call tools: a short
supervised LoRA fine-tune on benign tool-use data (training/tool_sft.py), saved merged with a tool template;
OUT is then the --model of `train` (recipe smollm2-135m-agent).

Only argparse and the config load at registration; the trainer loads inside `run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from ..config import (COMMAND_LINE, RECIPES_DIR, ConfigError, RRConfig, parse_overrides, read_yaml, recipe_path,
                      shipped_names, shipped_yaml)

ACCELERATE_CONFIGS_DIR = Path(__file__).parent.parent / "accelerate_configs"


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="circuit-break a model with Representation Rerouting",
                                  epilog="config keys:\n" + RRConfig.help(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config",
                       help=f"YAML file or shipped recipe name ({', '.join(shipped_names(RECIPES_DIR))})")
    train.add_argument("--model", help="hub id, checkpoint directory, .gguf file or smollm2-135m")
    train.add_argument("--out", help="output directory (required unless --resume)")
    train.add_argument("--resume", metavar="DIR",
                       help="continue a run: its output directory (newest checkpoint) or one of its "
                            "checkpoints/step-N; the run's own config is used")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    names = ", ".join(shipped_names(ACCELERATE_CONFIGS_DIR))
    train.add_argument("--accelerate-config", metavar="NAME",
                       help=f"start this command through `accelerate launch` with a shipped config ({names}) "
                            "or an accelerate YAML file")
    train.add_argument("--num-processes", type=int, help="with --accelerate-config: processes (GPUs) to start")
    train.add_argument("--teach-tools", action="store_true",
                       help="instead of RR: teach the model to call tools (supervised LoRA on benign tool-use data) "
                            f"and save it merged to --out; key=value sets {', '.join(TEACH_KEYS)}")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args) -> int:
    if getattr(args, "teach_tools", False):
        return _teach_tools(args)
    if args.accelerate_config:
        return _launch(args, args.argv)
    return _train(args)


def accelerate_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of an accelerate config shipped in the package (multi-gpu, fsdp, ...)."""
    return shipped_yaml(name_or_path, ACCELERATE_CONFIGS_DIR, "--accelerate-config", "config")


def _strip_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without `--opt VALUE` / `--opt=VALUE` for each of `options`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            kept.append(arg)
    return kept


def accelerate_command(argv: list[str], config: str, num_processes: int | None = None) -> list[str]:
    """`accelerate launch --config_file CONFIG [--num_processes N] -m circuit_breakers ARGV` (without the
    launcher options), as a command line for os.execv."""
    path = accelerate_config_path(config)
    engine = str(read_yaml(path).get("distributed_type", "")).upper()
    if engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{path.name} launches through DeepSpeed, which is not installed: "
                          "pip install 'circuit-breakers[deepspeed]'")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    return command + ["-m", "circuit_breakers", *_strip_options(argv, ("--accelerate-config", "--num-processes"))]


def _launch(args, argv: list[str]) -> int:
    """Re-run this very command under `accelerate launch`; the config is checked here first."""
    if not args.resume:
        if not args.out:
            raise ConfigError("train needs --out (or --resume DIR)")
        overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
        RRConfig.load(recipe_path(args.config) if args.config else None, overrides)
    command = accelerate_command(argv, args.accelerate_config, args.num_processes)
    print(f"circuit-breakers: launching: {shlex.join(command)}", file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 1  # pragma: no cover - execv does not return


def _check_out_creatable(out: Path) -> None:
    """Fail now if --out could not be made and written, without making it: a command that fails a later check
    leaves no empty directory behind."""
    from .checkpoint import OutputDirError, check_writable

    existing = Path(out).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != Path(out).absolute() and not existing.is_dir():
        raise OutputDirError(f"output directory {out} is not writable ({existing} is not a directory); "
                             "choose another --out")
    check_writable(existing)  # an existing directory: a file written and removed there, nothing created


def _train(args) -> int:
    from ..data.builtin import check_training_data
    from ..models import check_model
    from . import RRTrainer
    from . import checkpoint as ckpt

    resume = None
    if args.resume:
        if args.config or args.model:
            raise ConfigError("--resume continues a run with its own config: drop --config and --model")
        out, checkpoint = ckpt.resolve_resume(args.resume)
        if args.out and Path(args.out).resolve() != out.resolve():
            raise ConfigError(f"--out {args.out} is not the resumed run's directory {out}")
        config = ckpt.resume_config(out, checkpoint, {})  # the run's own config: its errors name its file
        if changes := parse_overrides(args.overrides):
            RRConfig.from_dict({**config.to_dict(), **changes}, where=COMMAND_LINE)  # a bad value names it
            config = ckpt.resume_config(out, checkpoint, changes)  # refuses keys that would change the result
        resume = checkpoint or True
        print(f"resuming {out} from {checkpoint or 'step 0 (no checkpoint was written)'}", file=sys.stderr)
    else:
        if not args.out:
            raise ConfigError("train needs --out (or --resume DIR)")
        out = Path(args.out)
        overrides = list(args.overrides)
        if args.model:
            overrides.append(f"model={args.model}")
        config = RRConfig.load(recipe_path(args.config) if args.config else None, overrides)
    # Everything that can be checked without the model, before it loads (minutes at 8B); --out is created last.
    _check_out_creatable(out)
    check_model(config.model, dtype=config.dtype, device=config.device)
    check_training_data(config)
    ckpt.check_writable(out)
    trainer = RRTrainer(config, progress=not args.no_progress)
    result = trainer.train(out, resume=resume)  # Ctrl-C: cli.py says where the last checkpoint is
    if trainer.dist.is_main:
        last = result.log[-1] if result.log else {"rerouting_loss": None, "retain_loss": float("nan")}
        print(f"saved {result.output_dir}/model (merged) and {result.output_dir}/adapter; "
              f"last step: rerouting_loss={last['rerouting_loss']} retain_loss={last['retain_loss']:.4g}")
    trainer.dist.close()
    return 0


# ---------------------------------------------------------------- train --teach-tools

# key=value settings of --teach-tools: teach_tool_calls's own, plus where the model runs and what it learns from.
TEACH_KEYS = ("steps", "lr", "lora_r", "lora_alpha", "batch_size", "max_length", "seed", "data", "dtype", "device")
TEACH_DATA = "builtin:tools_benign"


def _teach_settings(overrides: list[str]) -> dict:
    from .tool_sft import TOOL_SFT_DEFAULTS

    values = parse_overrides(overrides)
    unknown = sorted(set(values) - set(TEACH_KEYS))
    if unknown:
        raise ConfigError(f"train --teach-tools: unknown key(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(TEACH_KEYS)}")
    settings = {**TOOL_SFT_DEFAULTS, "lora_alpha": None, "data": [TEACH_DATA], "dtype": "auto", "device": "auto",
                **values}
    if isinstance(settings["data"], str):
        settings["data"] = [settings["data"]]
    for key in ("steps", "lora_r", "batch_size", "max_length", "seed"):
        least = 0 if key == "seed" else 1
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < least:
            raise ConfigError(f"train --teach-tools: {key}={settings[key]!r}: expected an integer >= {least}")
    for key in ("lr", "lora_alpha"):
        value = settings[key]
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
            try:
                value = settings[key] = float(value)
            except ValueError:
                pass
        if not (value is None and key == "lora_alpha") and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
            raise ConfigError(f"train --teach-tools: {key}={value!r}: expected a number > 0")
    if not isinstance(settings["data"], list) or not all(isinstance(d, str) for d in settings["data"]):
        raise ConfigError(f"train --teach-tools: data={settings['data']!r}: expected {TEACH_DATA}, a data file, "
                          "or a list of them")
    return settings


def _teach_examples(specs: list[str]):
    from ..data import load_examples
    from ..data.builtin import builtin_tool_set

    examples = []
    for spec in specs:
        examples += builtin_tool_set("benign", "train") if spec == TEACH_DATA else load_examples(spec)
    if not examples:
        raise ConfigError(f"train --teach-tools: data={specs} holds no examples")
    return examples


def _teach_tools(args) -> int:
    import time

    from ..models import base_model_name, check_model, load_model
    from .tool_sft import save_tool_model, teach_tool_calls

    for flag, value in (("--config", args.config), ("--resume", args.resume),
                        ("--accelerate-config", args.accelerate_config)):
        if value:
            raise ConfigError(f"train --teach-tools takes no {flag}: it runs in this process with its own settings "
                              f"({', '.join(TEACH_KEYS)})")
    if not args.out:
        raise ConfigError("train --teach-tools needs --out")
    spec = args.model or "smollm2-135m"
    settings = _teach_settings(args.overrides)
    out = Path(args.out)
    _check_out_creatable(out)
    check_model(spec, dtype=settings["dtype"], device=settings["device"])
    examples = _teach_examples(settings["data"])
    model, tokenizer = load_model(spec, dtype=settings["dtype"], device=settings["device"])
    log: list[dict] = []

    def on_step(record: dict) -> None:
        log.append(record)
        step = record["step"]
        if not args.no_progress and (step == 1 or step % 10 == 0 or step == settings["steps"]):
            print(f"teach-tools: step {step}/{settings['steps']} loss {record['loss']:.4f} "
                  f"({record['seconds']:.0f} s)", file=sys.stderr, flush=True)

    start = time.perf_counter()
    taught = teach_tool_calls(model, tokenizer, examples, on_step=on_step,
                              **{k: settings[k] for k in ("steps", "lr", "lora_r", "lora_alpha", "batch_size",
                                                          "max_length", "seed")})
    seconds = time.perf_counter() - start
    save_tool_model(taught, tokenizer, out, base_model=base_model_name(spec),
                    settings={**settings, "model": spec, "examples": len(examples), "seconds": round(seconds, 1)},
                    log=log)
    print(f"saved {out} (merged; its tokenizer renders tools) after {settings['steps']} steps in {seconds:.0f} s, "
          f"last loss {log[-1]['loss']:.4g}; circuit-break it with `circuit-breakers train --config "
          f"smollm2-135m-agent --model {out} --out runs/agent-rr`")
    return 0
