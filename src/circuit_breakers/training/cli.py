"""`circuit-breakers train`: circuit-break a model, in this process or re-executed under `accelerate launch`.

    circuit-breakers train --config smollm2-135m --out runs/rr steps=150
    circuit-breakers train --resume runs/rr
    circuit-breakers train --accelerate-config multi-gpu --num-processes 4 --config llama3-8b --out runs/rr

Only argparse and the config load at registration; the trainer loads inside `run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from ..config import COMMAND_LINE, ConfigError, RRConfig, parse_overrides, read_yaml, recipe_path, shipped_yaml

ACCELERATE_CONFIGS_DIR = Path(__file__).parent.parent / "accelerate_configs"


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="circuit-break a model with Representation Rerouting",
                                  epilog="config keys:\n" + RRConfig.help(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="YAML file or shipped recipe name (llama3-8b, mistral-7b, smollm2-135m)")
    train.add_argument("--model", help="hub id, checkpoint directory, .gguf file or smollm2-135m")
    train.add_argument("--out", help="output directory (required unless --resume)")
    train.add_argument("--resume", metavar="DIR",
                       help="continue a run: its output directory (newest checkpoint) or one of its "
                            "checkpoints/step-N; the run's own config is used")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")))
    train.add_argument("--accelerate-config", metavar="NAME",
                       help=f"start this command through `accelerate launch` with a shipped config ({names}) "
                            "or an accelerate YAML file")
    train.add_argument("--num-processes", type=int, help="with --accelerate-config: processes (GPUs) to start")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args) -> int:
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
    return 0
