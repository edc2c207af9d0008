"""The `circuit-breakers` command. Thin: parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError
from .data.schema import DataError
from .models import ModelError

# Every subcommand lives beside the code it drives: each module has `register(subparsers)` (adds its
# parser, imports nothing heavy) and `run(args) -> int` (args.argv: the command line the args came from).
# Listed here, in help order.
SUBCOMMAND_MODULES = {
    "train": "circuit_breakers.training.cli",
    "data": "circuit_breakers.data.cli",
    "demo": "circuit_breakers.demo",
    "eval": "circuit_breakers.evaluation.cli",
    "probe": "circuit_breakers.probes.cli",
    "serve": "circuit_breakers.serving.cli",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuit-breakers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES.values():
        importlib.import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.argv = argv  # `train --accelerate-config` re-executes the command line itself
    module = importlib.import_module(SUBCOMMAND_MODULES[args.command])
    try:
        return module.run(args)
    except (ConfigError, DataError, ModelError) as err:
        print(f"circuit-breakers: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a NaN or infinite loss: the message names the step and the checkpoint
        print(f"circuit-breakers: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
