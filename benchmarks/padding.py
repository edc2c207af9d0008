"""How much of a recipe's batches is padding: the trainer's length-grouped batches against random ones.

    python benchmarks/padding.py --config smollm2-135m-agent model=runs/demo-agent/subject
    python benchmarks/padding.py --config smollm2-135m seed=7

Tokenises the recipe's circuit-breaker and retain sets as `train` does, draws the batches of its `steps` steps
(`training.batch_indices`, the trainer's seeds) and counts the tokens a padded batch computes (batch size x
its longest item) against the items' own. Nothing is trained; the model is loaded for its tokenizer.
"""

from __future__ import annotations

import argparse

from circuit_breakers.config import RRConfig, recipe_path
from circuit_breakers.training import RRTrainer
from circuit_breakers.training.batches import batch_indices


def padding(lengths: list[int], batch_size: int, seed: int, steps: int, group_by_length: bool) -> dict:
    draw = batch_indices(lengths, batch_size, seed, group_by_length=group_by_length)
    real = computed = 0
    for _ in range(steps):
        batch = next(draw)
        real += sum(lengths[i] for i in batch)
        computed += len(batch) * max(lengths[i] for i in batch)
    return {"real": real, "computed": computed, "padding": 1 - real / computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2-135m", help="a shipped recipe name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value settings, as `train` takes them")
    args = parser.parse_args()
    config = RRConfig.load(recipe_path(args.config), args.overrides)
    trainer = RRTrainer(config, progress=False)
    print(f"{args.config}: batch {config.batch_size}, {config.steps} steps, seed {config.seed}")
    print(f"{'set':<16} {'items':>6} {'batches':<14} {'real tokens':>12} {'computed':>12} {'padding':>8}")
    for name, items, seed in (("circuit-breaker", trainer.cb_items, config.seed),
                              ("retain", trainer.retain_items, config.seed + 1)):
        lengths = [x.length for x in items]
        for grouped in (True, False):
            counts = padding(lengths, config.batch_size, seed, config.steps, grouped)
            print(f"{name:<16} {len(items):>6} {'length-grouped' if grouped else 'random':<14} "
                  f"{counts['real']:>12,} {counts['computed']:>12,} {counts['padding']:>8.1%}")


if __name__ == "__main__":
    main()
