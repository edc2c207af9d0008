"""Evaluation shared out over processes: rank r takes behaviours r::N, rank 0 merges one samples.jsonl
and one results.json equal to a single-process run's. Two gloo processes, a fake attack, no model."""
import json
import os
import socket

import torch.multiprocessing as mp

from circuit_breakers.evaluation.harness import evaluate, read_samples
from circuit_breakers.evaluation.sharding import SHARDS_DIR, merge_samples
from circuit_breakers.judges import RefusalJudge

from .test_harness import BEHAVIORS, FakeAttack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_process(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    from circuit_breakers.evaluation.sharding import evaluate_sharded, init_shard_processes

    assert init_shard_processes() == (rank, world)
    attack = FakeAttack(samples=2)
    results = evaluate_sharded(None, None, BEHAVIORS, [attack], RefusalJudge(), out, rank=rank, world=world,
                               baseline=object(), progress=False)
    seen = [b for call in attack.calls for b in call]
    with open(os.path.join(out, f"process{rank}.json"), "w") as handle:
        json.dump({"seen": seen, "asr": results["asr"]}, handle)


def _key(r: dict) -> tuple:
    return r["model"], r["attack"], r["behavior_id"], r["sample_index"], r["output"], r["label"]


def test_two_processes_share_the_behaviours_and_merge_one_report(tmp_path):
    out = tmp_path / "sharded"
    mp.start_processes(_shard_process, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    processes = [json.loads((out / f"process{r}.json").read_text()) for r in (0, 1)]
    # Each behaviour attacked once per model, by the process r with index % 2 == r.
    assert sorted(processes[0]["seen"]) == sorted(["b0", "b2", "b4"] * 2)
    assert sorted(processes[1]["seen"]) == sorted(["b1", "b3", "b5"] * 2)

    single = evaluate(None, None, BEHAVIORS, [FakeAttack(samples=2)], RefusalJudge(), tmp_path / "one",
                      baseline=object(), progress=False)
    merged = json.loads((out / "results.json").read_text())
    assert merged["asr"] == single["asr"] and merged["shards"] == 2
    assert merged["behaviors"] == single["behaviors"]
    assert processes[0]["asr"] == processes[1]["asr"] == single["asr"]  # every process returns the merged results
    got, want = read_samples(out / "samples.jsonl"), read_samples(tmp_path / "one" / "samples.jsonl")
    assert sorted(map(_key, got)) == sorted(map(_key, want))
    assert not (out / SHARDS_DIR).exists()


def test_merge_takes_each_behaviour_from_one_file_only(tmp_path):
    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    row = lambda b, i, out: {"model": "m", "attack": "a", "behavior_id": b, "sample_index": i, "output": out}  # noqa: E731
    write(tmp_path / "x.jsonl", [row("b0", 0, "first"), row("b0", 1, "first")])
    write(tmp_path / "y.jsonl", [row("b0", 0, "second"), row("b1", 0, "second")])
    merged = merge_samples([tmp_path / "x.jsonl", tmp_path / "y.jsonl", tmp_path / "missing.jsonl"])
    assert [(r["behavior_id"], r["sample_index"], r["output"]) for r in merged] == [
        ("b0", 0, "first"), ("b0", 1, "first"), ("b1", 0, "second")]
