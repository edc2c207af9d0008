"""Evaluation spread over processes (`accelerate launch` or `torchrun` with N processes).

Process r attacks behaviours r, r+N, r+2N, ... through the ordinary `evaluate`, into its own shard
directory OUT/shards/rank{r}-of-{N}/ (its own samples.jsonl, so each shard resumes on its own). After
a barrier, rank 0 merges every shard's samples, and any earlier OUT/samples.jsonl, into
OUT/samples.jsonl, scores all behaviours into OUT/results.json, and removes OUT/shards. The other
processes then return the same results. OUT must be a directory every process can write (a shared
file system across machines).

Sampled attacks draw from other RNG streams than in one process (each shard is seeded on its own), so
a sharded run is not sample-for-sample the same as a single-process one; greedy attacks are.

The barrier uses a gloo process group with a long timeout (no GPU collectives: shards may finish
hours apart). Each process uses the GPU of its LOCAL_RANK.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

SHARDS_DIR = "shards"


def process_shard() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) without one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_shard_processes() -> tuple[int, int]:
    """Under a launcher: join the process group (gloo, long timeout) and pick this process's GPU."""
    rank, world = process_shard()
    if world > 1:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return rank, world


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _sample_sources(out: Path, world: int, resume: bool) -> list[Path]:
    from .harness import SAMPLES_FILE

    shards = out / SHARDS_DIR
    mine = [shards / f"rank{r}-of-{world}" / SAMPLES_FILE for r in range(world)]
    if not resume:
        return mine
    earlier = sorted(p for p in shards.glob(f"*/{SAMPLES_FILE}") if p not in mine) if shards.is_dir() else []
    return [out / SAMPLES_FILE, *mine, *earlier]


def merge_samples(paths: Sequence[Path]) -> list[dict]:
    """Records from several samples files; a (model, attack, behaviour) comes from the first file that has it."""
    from .harness import read_samples

    owner: dict[tuple, Path] = {}
    merged = []
    for path in paths:
        for record in read_samples(path):
            key = (record["model"], record["attack"], record["behavior_id"])
            if owner.setdefault(key, path) == path:
                merged.append(record)
    return merged


def evaluate_sharded(model, tokenizer, behaviors, attacks: list, judge, out_dir, *, rank: int, world: int,
                     resume: bool = True, progress: bool = True, **kwargs) -> dict:
    """`evaluate` on behaviours rank::world, then one merged samples.jsonl and results.json (see the module)."""
    import time

    from ..atomic import atomic_write_text
    from .harness import (BASELINE_NAME, MODEL_NAME, RESULTS_FILE, SAMPLES_FILE, build_results, evaluate,
                          write_results)

    out = Path(out_dir)
    started = time.time()
    shard_dir = out / SHARDS_DIR / f"rank{rank}-of-{world}"
    evaluate(model, tokenizer, behaviors[rank::world], attacks, judge, shard_dir, resume=resume,
             progress=progress and rank == 0, **kwargs)
    _barrier()
    if rank == 0:
        records = merge_samples(_sample_sources(out, world, resume))
        atomic_write_text(out / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        models = [kwargs.get("model_name", MODEL_NAME)] + ([BASELINE_NAME] if kwargs.get("baseline") is not None else [])
        results = build_results(records, behaviors, attacks, judge, seed=kwargs.get("seed", 0), models=models)
        results["seconds"] = round(time.time() - started, 1)
        results["shards"] = world
        results.update(kwargs.get("extra") or {})
        write_results(out, results)
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    _barrier()
    return json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
