"""`circuit-breakers probe train|eval`: harmfulness probes (docs/probes.md). Heavy imports stay in run()."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import AT_LEAST_ONE, MIN_MAX_LENGTH, NON_NEGATIVE, POSITIVE, Bounds, bounded

COUNT = bounded(int, AT_LEAST_ONE)
MAX_LENGTH = bounded(int, Bounds(MIN_MAX_LENGTH, why="room for a chat-formatted request and a response"))


def register(subparsers) -> None:
    probe = subparsers.add_parser("probe", help="train and evaluate harmfulness probes (a runtime monitor)")
    actions = probe.add_subparsers(dest="probe_command", required=True)

    train = actions.add_parser("train", help="train a probe, calibrate its threshold, save it")
    train.add_argument("--model", default="smollm2-135m", help="hub id, checkpoint directory, .gguf or smollm2-135m")
    train.add_argument("--layer", type=bounded(int, NON_NEGATIVE), help="hidden-state entry (block l-1's output); "
                       "default: measured for smollm2-135m (20), else the middle of the stack")
    train.add_argument("--kind", choices=("linear", "mlp"), default="linear")
    train.add_argument("--fpr", type=bounded(float, Bounds(0, 1, high_open=True)), default=0.01,
                       help="target false-positive rate on the calibration responses, held-out benign ones the "
                       "probe is not fitted on (default 0.01)")
    train.add_argument("--out", required=True, help="output directory (probe.safetensors, probe.json)")
    train.add_argument("--positive", action="append", metavar="FILE",
                       help="harmful (circuit-breaker) data; repeatable (default: built-in harmful.train)")
    train.add_argument("--negative", action="append", metavar="FILE",
                       help="retain data; repeatable (default: built-in benign/borderline/refusal train)")
    train.add_argument("--heldout", action="append", metavar="FILE",
                       help="benign responses to calibrate on; repeatable (default: a held-out part of the "
                       "negative sets, built-in: of benign.train and borderline.train; see "
                       "--calibration-fraction)")
    train.add_argument("--calibration-fraction", type=bounded(float, Bounds(0, 1, low_open=True, high_open=True)),
                       default=0.2, metavar="F",
                       help="without --heldout: the fraction of every category of the benign retain sets "
                       "(built-in: benign.train, borderline.train; else every --negative file) held out from "
                       "fitting to calibrate the threshold on, by item with a fixed seed (default 0.2)")
    train.add_argument("--max-tokens-per-item", type=COUNT, help="first N response tokens of every training item "
                       "only (calibration always scores whole responses)")
    train.add_argument("--max-length", type=MAX_LENGTH, default=1024)
    train.add_argument("--epochs", type=COUNT, default=10)
    train.add_argument("--lr", type=bounded(float, POSITIVE), default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    _common(train)

    evaluate = actions.add_parser("eval", help="TPR on harmful responses, FPR on benign ones")
    evaluate.add_argument("--model", default="smollm2-135m")
    evaluate.add_argument("--probe", required=True, help="probe directory")
    evaluate.add_argument("--samples", help="an evaluation's samples.jsonl (its label=harmful outputs)")
    evaluate.add_argument("--samples-model", metavar="NAME", help="only the samples of this `model` field "
                          "(an evaluation writes e.g. model and baseline samples into one file)")
    evaluate.add_argument("--harmful", action="append", metavar="FILE", help="harmful responses; repeatable "
                          "(default: built-in harmful.test)")
    evaluate.add_argument("--benign", action="append", metavar="FILE", help="benign responses; repeatable "
                          "(default: built-in benign.test and borderline.test)")
    evaluate.add_argument("--allow-overlap", action="store_true", help="report sets that hold items the probe "
                          "was fitted or calibrated on (refused by default: their rates are in-sample), marked "
                          "IN-SAMPLE")
    evaluate.add_argument("--max-tokens-per-item", type=COUNT, help="first N response tokens of every item only")
    evaluate.add_argument("--max-length", type=MAX_LENGTH, default=1024)
    evaluate.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    _common(evaluate)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=COUNT, default=8, help="items per forward")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")


def _files(paths: list[str] | None) -> dict | None:
    if not paths:
        return None
    from ..data.loaders import load_examples

    sets = {}
    for path in paths:
        name = Path(path).name
        while name in sets:
            name += "'"
        sets[name] = load_examples(path)
    return sets


def _check_layer(model, layer: int | None) -> None:
    """A probe's hidden-state entry must exist in the model: 0 (embeddings) to the number of blocks."""
    from ..models import find_architecture
    from .probe import ProbeError

    blocks = find_architecture(model).num_blocks
    if layer is not None and layer > blocks:
        raise ProbeError(f"probe layer {layer}: this model has {blocks} blocks, so hidden-state entries 0 to {blocks}")


def run(args) -> int:
    from .probe import ProbeError

    import warnings

    from .splits import ProbeOverlapWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ProbeOverlapWarning)
            try:
                if args.probe_command == "train":
                    return _train(args)
                return _eval(args)
            finally:
                for w in caught:
                    if issubclass(w.category, ProbeOverlapWarning):
                        print(f"circuit-breakers: WARNING: {w.message}", file=sys.stderr)
                    else:  # someone else's warning: show it as Python would have
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except ProbeError as err:
        print(f"circuit-breakers: error: {err}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from ..models import check_model, load_model
    from .train import train_probe

    # A bad model, device or data file fails before the model loads.
    check_model(args.model, dtype=args.dtype, device=args.device)
    positive, negative, heldout = _files(args.positive), _files(args.negative), _files(args.heldout)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    _check_layer(model, args.layer)
    probe = train_probe(model, tokenizer, args.layer, args.kind, args.fpr, args.out,
                        positive=positive, negative=negative,
                        heldout_benign=heldout, calibration_fraction=args.calibration_fraction,
                        seed=args.seed,
                        max_tokens_per_item=args.max_tokens_per_item, max_length=args.max_length,
                        batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                        base_model=args.model,
                        progress=not args.no_progress)
    calibration = probe.info.get("calibration", {})
    sets = " + ".join(f"{name} {s['items']}" for name, s in calibration.get("sets", {}).items())
    print(f"saved {args.out}/probe.safetensors and probe.json: {probe.kind} probe at layer {probe.layer}, "
          f"threshold {probe.threshold:.4g} (logit {probe.threshold_logit:.4g}) for FPR <= {args.fpr} on "
          f"{calibration.get('responses')} calibration responses not fitted on ({sets}; achieved "
          f"{calibration.get('tripped')}/{calibration.get('responses')} = {calibration.get('achieved_fpr'):.3f}); "
          f"final training loss {probe.history[-1]:.4f}")
    return 0


def _eval(args) -> int:
    import json

    from ..atomic import atomic_write_text
    from ..models import check_model, load_model
    from .evaluate import evaluate_probe, read_attack_samples
    from .probe import load_probe

    # The probe, model, device and data files are checked before the model loads.
    probe = load_probe(args.probe)
    check_model(args.model, dtype=args.dtype, device=args.device)
    harmful, benign = _files(args.harmful), _files(args.benign)
    if args.samples:
        read_attack_samples(args.samples, model=args.samples_model)
    recorded = probe.info.get("base_model")
    if recorded and recorded != args.model:
        print(f"warning: the probe was trained on {recorded}, evaluating on {args.model}", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    _check_layer(model, probe.layer)
    result = evaluate_probe(model, tokenizer, probe, harmful=harmful, benign=benign,
                            samples=args.samples, samples_model=args.samples_model,
                            max_tokens_per_item=args.max_tokens_per_item,
                            max_length=args.max_length, batch_size=args.batch_size,
                            progress=not args.no_progress, allow_overlap=args.allow_overlap)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return 0
