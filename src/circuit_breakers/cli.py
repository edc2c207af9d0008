"""The `circuit-breakers` command. Thin: parses arguments and calls the Python API.

No input ends in a traceback: a bad config, data file, model, device or output directory is one line on
stderr naming what is wrong (exit status 2; 1 for a file-system failure, a missing package or a non-finite
loss), and Ctrl-C or SIGTERM stops the command with one line (exit status 130 or 143; `train` says where
its last checkpoint is). A second Ctrl-C exits at once. A failed command leaves no empty --out behind.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
from pathlib import Path

from .config import ConfigError
from .data.schema import DataError
from .models import ModelError
from .stopping import StopSignals

# Every subcommand lives beside the code it drives: each module has `register(subparsers)` (adds its
# parser, imports nothing heavy) and `run(args) -> int` (args.argv: the command line the args came from).
# Listed here, in help order.
SUBCOMMAND_MODULES = {
    "train": "circuit_breakers.training.cli",
    "data": "circuit_breakers.data.cli",
    "demo": "circuit_breakers.demo",
    "eval": "circuit_breakers.evaluation.cli",
    "compare": "circuit_breakers.evaluation.compare_cli",
    "probe": "circuit_breakers.probes.cli",
    "serve": "circuit_breakers.serving.cli",
}
# The server shuts down gracefully on its own signal handlers (uvicorn's): the CLI leaves them alone.
OWN_SIGNAL_HANDLING = ("serve",)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuit-breakers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES.values():
        importlib.import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.argv = argv  # `train --accelerate-config` re-executes the command line itself
    module = importlib.import_module(SUBCOMMAND_MODULES[args.command])
    new_out = _first_missing(getattr(args, "out", None))
    code = 1
    with StopSignals(enabled=args.command not in OWN_SIGNAL_HANDLING) as signals:
        try:
            code = module.run(args)
        except (ConfigError, DataError, ModelError) as err:
            code = _error(err, 2)
        except (FloatingPointError, OSError, ImportError) as err:  # a non-finite loss names its step and checkpoint
            code = _error(err, 1)
        except KeyboardInterrupt as err:
            signum = signals.received or signal.SIGINT
            print(f"circuit-breakers: interrupted ({signal.Signals(signum).name}){_resume_hint(err)}",
                  file=sys.stderr)
            code = 128 + signum
        finally:
            if code != 0 and new_out is not None:
                _remove_if_empty(new_out)
    return code


def _error(err: BaseException, code: int) -> int:
    print(f"circuit-breakers: error: {err}", file=sys.stderr)
    return code


def _resume_hint(err: KeyboardInterrupt) -> str:
    """Where an interrupted training run (train, demo) stands and the command that continues it; else ""."""
    # Loaded when training ran; never imported here, which would load torch after a Ctrl-C.
    checkpoint = sys.modules.get("circuit_breakers.training.checkpoint")
    if checkpoint is None or not isinstance(err, checkpoint.TrainingInterrupted) or err.out is None:
        return ""
    resume = f"`circuit-breakers train --resume {shlex.quote(str(err.out))}`"
    if err.checkpoint is not None:
        return f" in training step {err.step}; the last checkpoint is {err.checkpoint}; continue with {resume}"
    return f" in training step {err.step}, before any checkpoint was written; {resume} starts it again"


# ---------------------------------------------------------------- --out


def _first_missing(out: str | None) -> Path | None:
    """The outermost directory on the way to `out` that does not exist yet (None when nothing would be new)."""
    if not out:
        return None
    path = Path(out).absolute()
    if path.exists() or path.is_symlink():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_if_empty(top: Path) -> None:
    """Remove `top` when it holds nothing but empty directories: what a failed command created and never used."""
    if not top.is_dir() or top.is_symlink():
        return
    for directory, _, files in os.walk(top, topdown=False):
        if files:
            return
        try:
            os.rmdir(directory)
        except OSError:  # not empty after all (a symlink, something written meanwhile): keep it
            return


if __name__ == "__main__":
    sys.exit(main())
