"""Which layer to probe: one linear probe per layer on the same items, compared on held-out responses.

    python benchmarks/probe_layers.py --model smollm2-135m --layers 5 10 15 20 25 30 --limit 80 \
        --max-tokens-per-item 32

One forward pass per batch captures every requested layer (hidden-state entries, hidden.py numbering).
Training: the first --limit items of each built-in train set (harmful positive; benign, borderline,
refusal negative). Held out: harmful.test against benign.test + borderline.test, per response (max
token score). Reported per layer: AUROC, and the TPR at a threshold set for --fpr on those same
benign responses (an in-sample calibration: fine for ranking layers, optimistic as an absolute figure).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from circuit_breakers.data.builtin import generated_set
from circuit_breakers.models import find_architecture, load_model
from circuit_breakers.probes import calibrate_threshold, make_probe, response_max
from circuit_breakers.probes.evaluate import auroc
from circuit_breakers.probes.features import example_features


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", help="default: every 5th entry and the last")
    parser.add_argument("--kind", choices=("linear", "mlp"), default="linear")
    parser.add_argument("--limit", type=int, default=80, help="items per training set")
    parser.add_argument("--max-tokens-per-item", type=int, default=32)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    started = time.time()
    model, tokenizer = load_model(args.model)
    n = find_architecture(model).num_blocks
    layers = args.layers or sorted(set(range(5, n + 1, 5)) | {n})
    options = dict(max_tokens_per_item=args.max_tokens_per_item, batch_size=args.batch_size)

    def feats(name, split, limit=None):
        return example_features(model, tokenizer, generated_set(name, split)[:limit], layers, **options)

    train = {name: feats(name, "train", args.limit) for name in ("harmful", "benign", "borderline", "refusal")}
    harmful_test = feats("harmful", "test")
    benign_test = [feats("benign", "test"), feats("borderline", "test")]
    print(f"features: {time.time() - started:.0f} s; train tokens "
          + ", ".join(f"{k}={v[layers[0]].n_tokens}" for k, v in train.items()))
    print(f"{'layer':>5} {'AUROC':>7} {'TPR@' + str(args.fpr):>9} {'train loss':>10}")
    for layer in layers:
        X = torch.cat([train[name][layer].features for name in train])
        y = torch.cat([torch.full((train[name][layer].n_tokens,), float(name == "harmful")) for name in train])
        probe = make_probe(args.kind, X.shape[1], layer=layer).fit(X, y, epochs=args.epochs)

        def maxima(f):
            return response_max(probe.logits(f[layer].features), f[layer].item_index, f[layer].n_items)

        pos = maxima(harmful_test)
        neg = torch.cat([maxima(f) for f in benign_test])
        threshold = calibrate_threshold(neg, args.fpr)
        tpr = float((pos > threshold).double().mean())
        print(f"{layer:>5} {auroc(pos, neg):>7.3f} {tpr:>9.3f} {probe.history[-1]:>10.4f}")
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
