"""`circuit-breakers compare`: the base model and several defences under one eval config, one report.

    circuit-breakers compare --base smollm2-135m --defence rr=runs/rr/model \
        --defence repbend=configs/smollm2-135m-repbend.yaml --eval-config compare --out runs/compare

Each --defence is NAME=MODEL_DIR (a trained model, or a `train` output directory with model/ in it) or
NAME=RECIPE (a training YAML or a shipped recipe name, trained on --base first into OUT/train/NAME/).
Writes OUT/comparison.json, OUT/report.md, OUT/report.html (table and Pareto plot) and, per defence,
OUT/models/NAME/ (that run's results.json and full report; a rerun reuses it while the eval config and the
model's files are unchanged). The base model is also evaluated with the
paper's safety system prompt (row safety-prompt, OUT/models/safety-prompt/; --safety-prompt TEXT for
another, --no-safety-prompt for none). See evaluation/comparison.py.

Only argparse is imported at registration; models, torch and the attacks load inside `run`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import AT_LEAST_ONE, ConfigError, bounded
from .pipeline import shipped_eval_configs


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="evaluate the base model and several defences under one eval config, one report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the original model: hub id, directory or smollm2-135m")
    p.add_argument("--defence", "--defense", action="append", default=[], metavar="NAME=MODEL_DIR_OR_RECIPE",
                   dest="defences", help="a defence to compare (repeatable): a trained model directory or a "
                                         "training recipe to train on --base first")
    p.add_argument("--eval-config", default="compare", metavar="NAME_OR_YAML",
                   help=f"the one budget for every model: a YAML file or a shipped one ({', '.join(shipped_eval_configs())}); "
                        "default: compare")
    p.add_argument("--attack", action="append", default=[], metavar="NAME.FIELD=VALUE",
                   help="one field of one attack's config, on top of the eval config (repeatable)")
    p.add_argument("--behaviors", help="HarmBench .csv or project .jsonl (default: the built-in harmful test split)")
    p.add_argument("--limit", type=bounded(int, AT_LEAST_ONE),
                   help="at most N behaviours (and N prompts per capability set)")
    safety = p.add_mutually_exclusive_group()
    safety.add_argument("--safety-prompt", metavar="TEXT", help="the safety-prompt row's system prompt (default: the "
                                                                "paper's, comparison.SAFETY_PROMPT)")
    safety.add_argument("--no-safety-prompt", action="store_true", help="no safety-prompt row")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-resume", action="store_true", help="evaluate every model again")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from .comparison import SAFETY_PROMPT, compare, parse_defences, summary
    from .pipeline import load_eval_config

    parse_defences(args.defences)  # every --defence checked before any model loads
    config = load_eval_config(args.eval_config)
    if args.limit is not None:
        config = dataclasses.replace(config, behaviors=args.limit, capability_prompts=args.limit,
                                     diagnostics_items=args.limit)
    try:
        config = config.with_attack_overrides(args.attack)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    behaviors = None
    if args.behaviors:
        from .behaviors import load_behaviors
        behaviors = load_behaviors(args.behaviors)
    from ..models import check_model
    check_model(args.base, dtype=args.dtype, device=args.device)
    results = compare(args.base, args.defences, config, args.out, behaviors=behaviors, dtype=args.dtype,
                      device=args.device, resume=not args.no_resume, progress=not args.no_progress,
                      safety_prompt=None if args.no_safety_prompt else (args.safety_prompt or SAFETY_PROMPT))
    print(summary(results))
    out = Path(args.out)
    print(f"wrote {out}/comparison.json, {out}/report.md, {out}/report.html, {out}/figures/pareto.png")
    return 0
