"""Data parallelism on CPU processes (gloo): 2 processes reach the weights of 1 process on the same
global batch, and every process holds the same weights. Launched with torchrun, which Accelerate
reads like its own launcher (on CPUs `accelerate launch` starts several processes only through MPI)."""
import json
import subprocess

import pytest
import torch

from circuit_breakers.config import ConfigError, RRConfig
from circuit_breakers.training.parallel import Distributed

from ..helpers import REPO, RELATIVE_TOLERANCE, assert_close_weights, launch_env, make_tiny_model, torchrun
from .distributed_worker import run

def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_checkpoint):
    # 2 processes x 2 micro-batches of 2 items == 1 process x 4 micro-batches of 2 items: the same
    # global batch of 8, the same micro-batches; gradients averaged once per optimizer step.
    proc = subprocess.run(torchrun(2, str(REPO / "tests" / "training" / "distributed_worker.py"), str(tiny_checkpoint), str(tmp_path),
                                    "2"), env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    single, single_log, rank = run(tiny_checkpoint, grad_accum=4)
    assert rank == 0

    for name in single:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), f"{name} differs across ranks"
    assert_close_weights(ranks[0]["weights"], single)
    g = torch.Generator().manual_seed(7)  # the B matrices `run` starts from, in the same order
    moved = max((w - torch.randn(w.shape, generator=g) * 0.05).abs().max().item()
                for n, w in single.items() if "lora_B" in n)
    assert moved > 100 * RELATIVE_TOLERANCE  # the comparison is not vacuous: training moved the weights
    for ddp, one in zip(ranks[0]["log"], single_log):  # the logged losses are the global batch's
        for key in ("rerouting_loss", "retain_loss", "cb_cos", "retain_cos", "grad_norm"):
            assert ddp[key] == pytest.approx(one[key], rel=RELATIVE_TOLERANCE), key


def test_global_batch_must_split_over_processes_and_micro_batches(chat_tokenizer, monkeypatch):
    from circuit_breakers.training import trainer as training

    fake = Distributed()
    fake.world = 2  # two processes, as seen from rank 0; no collective is reached before the check
    monkeypatch.setattr(training, "from_environment", lambda: fake)
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4)
    from ..helpers import tokenized_items
    config = RRConfig(model="x", target_layers=[2, 3], batch_size=6, grad_accum=2, max_length=64)
    with pytest.raises(ConfigError, match=r"batch_size \(6\).*processes x grad_accum \(2 x 2 = 4\)"):
        training.RRTrainer(config, model=model, tokenizer=chat_tokenizer,
                           circuit_breaker_items=tokenized_items(chat_tokenizer, 4, harmful=True),
                           retain_items=tokenized_items(chat_tokenizer, 4, harmful=False), progress=False)


def test_shards_cover_the_global_batch_in_order():
    from circuit_breakers.training import RRTrainer

    trainer = RRTrainer.__new__(RRTrainer)
    shards = []
    for rank in range(4):
        trainer.dist = Distributed()
        trainer.dist.rank, trainer.dist.world = rank, 4
        shards.append(trainer._shard(list(range(8))))
    assert shards == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_cli_train_under_a_launcher(tmp_path, tiny_checkpoint):
    """`python -m circuit_breakers train` unchanged under a 2-process launcher: one log, one save, one line."""
    from circuit_breakers.data import write_jsonl

    write_jsonl(tmp_path / "h.jsonl", [{"prompt": f"How do I bake bread {i}?", "output": "Sure, here."} for i in range(6)])
    write_jsonl(tmp_path / "b.jsonl", [{"request": f"Explain rain {i}", "response": "Water falls."} for i in range(6)])
    out = tmp_path / "out"
    proc = subprocess.run(
        torchrun(2, "-m", "circuit_breakers", "train", "--out", str(out), "--model", str(tiny_checkpoint), "--no-progress",
                  "steps=4", "batch_size=4", "target_layers=[2,3]", "max_length=64", "save_every=2",
                  f"circuit_breaker_data=[{tmp_path / 'h.jsonl'}]", f"retain_data=[{tmp_path / 'b.jsonl'}]"),
        env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1  # rank 0 only
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    state = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["frozen_cache"]) == 2


def test_fsdp_sharded_run_saves_the_adapter_of_one_process(tmp_path, tiny_checkpoint):
    """FSDP2 on 2 CPU processes (what the fsdp and deepspeed-zero3 configs select): the adapter gathered
    from the shards at save time matches the 1-process weights; the checkpoint holds the full state."""
    from safetensors.torch import load_file

    env = {**launch_env(), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    proc = subprocess.run(torchrun(2, str(REPO / "tests" / "training" / "distributed_worker.py"), str(tiny_checkpoint), str(tmp_path),
                                    "2", "--save"), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "rank0.pt")["weights"]  # OUT/adapter, written by rank 0
    single, _, _ = run(tiny_checkpoint, grad_accum=4)
    assert_close_weights(saved, {name.replace(".default.", "."): value for name, value in single.items()})
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["parallel"] == "fsdp"
    assert len(load_file(checkpoint / "adapter" / "adapter_model.safetensors")) == len(single)
    assert (tmp_path / "run" / "model" / "config.json").is_file()  # merged from the original model on rank 0
