"""Turn evaluation outputs into items to label by hand (docs/labelling.md), without any judge's label.

    python scripts/labelling_view.py --eval-dir runs/demo/eval --tag demo-s42 \
        --source "runs/demo/model: smollm2-135m recipe at 2d7bad2, seed 42" --out runs/labels/demo-s42.jsonl

Reads EVAL_DIR/samples.jsonl (harmful prompts under attack; `model` -> "after", `baseline` ->
"before") and EVAL_DIR/capability_samples.jsonl (benign and borderline prompts), either may be
missing (a `recipe_robustness.py` run directory has only the second), and writes one line
per output in the labelling format with `label` left out: `prompt` is the behaviour's request (not
the attack's wrapped prompt), prefilling items carry `prefill` and their continuation as `output`,
templates items their `template`. Outputs already in `--skip` (labelled files) are left out, so the
same text is never labelled twice. The judge's label, reason and score are dropped: the labeller
must not see them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def harmful_items(eval_dir: Path, tag: str, requests: dict[str, str]) -> list[dict]:
    items = []
    path = eval_dir / "samples.jsonl"
    for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
        row = json.loads(line)
        extra = row.get("extra") or {}
        item = {"id": f"{tag}-{row['attack']}-{'before' if row['model'] == 'baseline' else 'after'}-"
                      f"{row['behavior_id'].rsplit('-', 1)[-1]}-{row['sample_index']}",
                "prompt": requests.get(row["behavior_id"], row["prompt"]), "prompt_kind": "harmful",
                "attack": row["attack"], "model": "before" if row["model"] == "baseline" else "after",
                "output": row["output"], "behavior_id": row["behavior_id"]}
        if "prefill" in extra:
            item["prefill"] = extra["prefill"]
            item["output"] = extra.get("continuation", row["output"])
        if extra.get("template_names"):
            item["template"] = extra["template_names"][row["sample_index"] % len(extra["template_names"])]
        items.append(item)
    return items


def capability_items(eval_dir: Path, tag: str) -> list[dict]:
    path = eval_dir / "capability_samples.jsonl"
    if not path.is_file():
        return []
    keep = ("prompt", "prompt_kind", "attack", "model", "output")
    return [{"id": f"{tag}-{row['id']}-{row['model']}", **{k: row[k] for k in keep}}
            for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from circuit_breakers.evaluation.behaviors import load_behaviors

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, type=Path)
    parser.add_argument("--tag", required=True, help="prefix of every id, e.g. the model and seed")
    parser.add_argument("--source", required=True, help="which models produced the outputs (recorded per item)")
    parser.add_argument("--skip", nargs="*", default=[], type=Path, help="labelled JSONL files: outputs to leave out")
    parser.add_argument("--benign", type=int, default=None, help="at most N benign items per model (seed 0)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    requests = {b.id: b.request for b in load_behaviors(None)}
    seen = {(r["prompt"], r["output"]) for path in args.skip
            for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    items = harmful_items(args.eval_dir, args.tag, requests)
    capability = capability_items(args.eval_dir, args.tag)
    if args.benign is not None:
        rng = random.Random(0)
        for model in ("before", "after"):
            benign = [i for i in capability if i["prompt_kind"] == "benign" and i["model"] == model]
            dropped = {i["id"] for i in benign} - {i["id"] for i in rng.sample(benign, min(args.benign, len(benign)))}
            capability = [i for i in capability if i["id"] not in dropped]
    items = [{**i, "source": args.source} for i in items + capability if (i["prompt"], i["output"]) not in seen]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    temporary.replace(args.out)
    print(f"{len(items)} items to label -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
