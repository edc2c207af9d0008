"""The `circuit-breakers` command. Thin: parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .config import ConfigError, RRConfig
from .data.schema import DataError
from .models import ModelError

RECIPES_DIR = Path(__file__).parent / "recipes"
ACCELERATE_CONFIGS_DIR = Path(__file__).parent / "accelerate_configs"

# Subcommands that live beside the code they drive: each module has `register(subparsers)` (adds its
# parser, imports nothing heavy) and `run(args) -> int`. Listed here; registered when installed.
SUBCOMMAND_MODULES = {
    "eval": "circuit_breakers.evaluation.cli",
    "probe": "circuit_breakers.probes.cli",
    "serve": "circuit_breakers.serving.cli",
}


def _subcommand_modules():
    for command, name in SUBCOMMAND_MODULES.items():
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            yield command, importlib.import_module(name)


def recipe_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a recipe shipped in the package (`llama3-8b`, `smollm2-135m`, ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"--config {name_or_path}: no such file, and no shipped recipe of that name ({names})")
    return shipped


def accelerate_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of an accelerate config shipped in the package (multi-gpu, fsdp, ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--accelerate-config {name_or_path}: no such file")
        return path
    shipped = ACCELERATE_CONFIGS_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")))
        raise ConfigError(f"--accelerate-config {name_or_path}: no such file, and no shipped config of that name "
                          f"({names})")
    return shipped


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
    from .config import read_yaml

    engine = str(read_yaml(path).get("distributed_type", "")).upper()
    if engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{path.name} launches through DeepSpeed, which is not installed: "
                          "pip install 'circuit-breakers[deepspeed]'")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    return command + ["-m", "circuit_breakers", *_strip_options(argv, ("--accelerate-config", "--num-processes"))]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuit-breakers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="circuit-break a model with Representation Rerouting",
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

    data = commands.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="generate the built-in sets' responses with a model")
    build.add_argument("--model", default="smollm2-135m")
    build.add_argument("--out", help="output directory (default: the package's data/generated/<model>)")
    build.add_argument("--max-new-tokens", type=int, default=160)
    build.add_argument("--batch-size", type=int, default=16)
    build.add_argument("--limit", type=int, help="at most this many prompts per set and split (for a quick look)")

    demo = commands.add_parser("demo", help="train the embedded default and compare it with the original")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--config", default="smollm2-135m", help="recipe for the demo's training")
    demo.add_argument("--retrain", action="store_true", help="train again even if OUT/model matches the config")
    demo.add_argument("--no-eval", action="store_true",
                      help="skip the evaluation (attacks, over-refusal, report in OUT/eval): "
                           "training and comparison only")
    demo.add_argument("--judge-agreement", action="store_true",
                      help="also measure the judges against the shipped hand labels (about 45 s on 2 cores)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    for _, module in _subcommand_modules():
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    try:
        if args.command == "train" and args.accelerate_config:
            return _launch(args, argv)
        if args.command == "train":
            return _train(args)
        if args.command == "data":
            return _data_build(args)
        if args.command == "demo":
            from .demo import run_demo
            config = RRConfig.load(recipe_path(args.config), args.overrides)
            run_demo(config, args.out, retrain=args.retrain, evaluate=not args.no_eval,
                     judge_agreement=args.judge_agreement)
            return 0
        for command, module in _subcommand_modules():
            if args.command == command:
                return module.run(args)
    except (ConfigError, DataError, ModelError) as err:
        print(f"circuit-breakers: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a NaN or infinite loss: the message names the step and the checkpoint
        print(f"circuit-breakers: error: {err}", file=sys.stderr)
        return 1
    return 1


def _launch(args, argv: list[str]) -> int:
    """Re-run this very command under `accelerate launch`; the config is checked here first."""
    if not args.resume:
        if not args.out:
            raise ConfigError("train needs --out (or --resume DIR)")
        overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
        RRConfig.load(recipe_path(args.config) if args.config else None, overrides)
    command = accelerate_command(argv, args.accelerate_config, args.num_processes)
    import shlex
    print(f"circuit-breakers: launching: {shlex.join(command)}", file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 1  # pragma: no cover - execv does not return


def _train(args) -> int:
    from .training import checkpoint as ckpt
    from .config import parse_overrides
    from .training import RRTrainer

    overrides = list(args.overrides)
    resume = None
    if args.resume:
        if args.config or args.model:
            raise ConfigError("--resume continues a run with its own config: drop --config and --model")
        out, checkpoint = ckpt.resolve_resume(args.resume)
        if args.out and Path(args.out).resolve() != out.resolve():
            raise ConfigError(f"--out {args.out} is not the resumed run's directory {out}")
        config = ckpt.resume_config(out, checkpoint, parse_overrides(overrides))
        resume = checkpoint or True
        print(f"resuming {out} from {checkpoint or 'step 0 (no checkpoint was written)'}", file=sys.stderr)
    else:
        if not args.out:
            raise ConfigError("train needs --out (or --resume DIR)")
        out = Path(args.out)
        if args.model:
            overrides.append(f"model={args.model}")
        config = RRConfig.load(recipe_path(args.config) if args.config else None, overrides)
    ckpt.check_writable(out)  # before the model loads: a bad --out fails in a second, not after minutes
    trainer = RRTrainer(config, progress=not args.no_progress)
    result = trainer.train(out, resume=resume)
    if trainer.dist.is_main:
        last = result.log[-1] if result.log else {"rerouting_loss": None, "retain_loss": float("nan")}
        print(f"saved {result.output_dir}/model (merged) and {result.output_dir}/adapter; "
              f"last step: rerouting_loss={last['rerouting_loss']} retain_loss={last['retain_loss']:.4g}")
    return 0


def _data_build(args) -> int:
    from .data.build import build_sets
    from .data.builtin import GENERATED_DIR
    from .models import load_model

    model, tokenizer = load_model(args.model)
    name = args.model if args.model == "smollm2-135m" else Path(args.model).name
    out = args.out or GENERATED_DIR / name
    manifest = build_sets(model, tokenizer, out, model_name=args.model, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, limit=args.limit)
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in manifest["counts"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
