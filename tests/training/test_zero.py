"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator, gloo), launched by
`accelerate launch` with the shipped configs: the same LoRA weights as 1 process on the same global
batch, the adapter gathered at save time, and a resumed run that ends where an uninterrupted one does."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuit_breakers.training import checkpoint as ckpt
from circuit_breakers.training.cli import accelerate_config_path
from circuit_breakers.config import ConfigError, RRConfig

from .distributed_worker import run
from ..helpers import REPO, RELATIVE_TOLERANCE, assert_close_weights, free_port, launch_env

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'circuit-breakers[deepspeed]')")


def _launch(config, model, out, *flags: str) -> subprocess.CompletedProcess:
    """2 processes x 2 micro-batches of 2 items: the global batch of the 1-process run with 4 micro-batches.
    `config`: a shipped config's name or an accelerate config file."""
    path = config if isinstance(config, Path) else accelerate_config_path(config)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
               "--num_processes", "2", "--main_process_port", str(free_port()),
               str(REPO / "tests" / "training" / "distributed_worker.py"), str(model), str(out), "2", *flags]
    return subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=900)


def _own_deepspeed_config(folder: Path) -> Path:
    """An accelerate config pointing at a DeepSpeed JSON of the user's, "auto" where the trainer decides."""
    (folder / "ds.json").write_text(json.dumps({
        "zero_optimization": {"stage": 2, "overlap_comm": True}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}))
    (folder / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
        f"machine_rank: 0\ndeepspeed_config:\n  deepspeed_config_file: {folder / 'ds.json'}\n  zero3_init_flag: false\n")
    return folder / "accelerate.yaml"


@needs_deepspeed
@pytest.mark.parametrize("config", ["deepspeed-zero2", "own deepspeed_config_file"])
def test_zero2_matches_one_process(tmp_path, tiny_checkpoint, config):
    out = tmp_path / "zero2"
    out.mkdir()
    if config.startswith("own"):
        config = _own_deepspeed_config(tmp_path)
    proc = _launch(config, tiny_checkpoint, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    single, single_log, _ = run(tiny_checkpoint, grad_accum=4)
    for name in single:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), f"{name} differs across ranks"
    assert_close_weights(ranks[0]["weights"], single)
    for got, want in zip(ranks[0]["log"], single_log, strict=True):  # DeepSpeed's gradient norm included
        for key in ("rerouting_loss", "retain_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=RELATIVE_TOLERANCE), key


@needs_deepspeed
def test_zero3_saves_the_gathered_adapter_and_resumes_to_the_same_one(tmp_path, tiny_checkpoint):
    out = tmp_path / "zero3"
    out.mkdir()
    proc = _launch("deepspeed-zero3", tiny_checkpoint, out, "--save")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out / "rank0.pt")["weights"]  # OUT/adapter, gathered from both partitions by rank 0
    single, _, _ = run(tiny_checkpoint, grad_accum=4)
    assert_close_weights(saved, {name.replace(".default.", "."): value for name, value in single.items()})
    assert (out / "run" / "model" / "config.json").is_file()  # merged from the original model on rank 0

    checkpoint = out / "run" / "checkpoints" / "step-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["parallel"], state["world_size"]) == ("deepspeed-zero3", 2)
    engine_files = sorted(p.name for p in (checkpoint / "deepspeed").rglob("*.pt"))
    assert sum("optim_states" in name for name in engine_files) == 2  # one optimizer partition per process
    assert not list((out / "run" / "checkpoints").glob(".step-*"))  # staging directories renamed into place

    # Resume from step 2 as if killed after it: step 3 again, from the checkpoint alone.
    for name in ("adapter", "model"):
        shutil.rmtree(out / "run" / name)
    proc = _launch("deepspeed-zero3", tiny_checkpoint, out, "--save", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(out / "rank0.pt")
    assert [record["step"] for record in resumed["log"]] == [1, 2, 3]
    for name, value in saved.items():
        assert torch.allclose(resumed["weights"][name], value, rtol=0, atol=1e-7), name


def test_zero3_checkpoint_does_not_resume_without_deepspeed(tmp_path, chat_tokenizer):
    """The optimizer state is in DeepSpeed's partitions: a plain run must refuse it, not start from zero."""
    from circuit_breakers.training import RRTrainer

    from ..helpers import make_tiny_model, tokenized_items

    config = RRConfig(model="x", target_layers=[2, 3], steps=2, batch_size=2, max_length=64)
    trainer = RRTrainer(config, model=make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4),
                        tokenizer=chat_tokenizer, circuit_breaker_items=tokenized_items(chat_tokenizer, 4, harmful=True),
                        retain_items=tokenized_items(chat_tokenizer, 4, harmful=False), progress=False)
    checkpoint = tmp_path / "checkpoints" / "step-1"
    checkpoint.mkdir(parents=True)
    trainer.model.save_pretrained(checkpoint / "adapter")
    (checkpoint / "rng.json").write_text(json.dumps({"world_size": 2, "states": []}))
    fingerprint = ckpt.data_fingerprint(trainer.cb_items, trainer.retain_items)
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {"step": 1, "world_size": 2, "parallel": "deepspeed-zero3", "config": config.to_dict(),
         "data_fingerprint": fingerprint, "batches_drawn": {"circuit_breaker": 1, "retain": 1}}))
    with pytest.raises(ConfigError, match="written by a deepspeed-zero3 run; resume it the same way"):
        ckpt.Checkpointer(tmp_path, config, trainer.dist, trainer.parallel, fingerprint).load(
            checkpoint, trainer.model, {}, trainer.device)


def test_deepspeed_is_imported_only_for_a_deepspeed_run():
    """(In a fresh interpreter: accelerate's own launcher helpers, used by other tests, may import it.)"""
    code = ("import sys, circuit_breakers.training, circuit_breakers.training.cli, circuit_breakers.training.parallel; "
            "circuit_breakers.training.cli.accelerate_command(['train', '--out', 'o'], 'fsdp'); "
            "print('deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


class _FakeAccelerator:
    """What ZeroEngine reads before `prepare`: the DeepSpeed plugin's config (as accelerate resolved it)."""

    def __init__(self, ds_config: dict) -> None:
        plugin = type("Plugin", (), {"deepspeed_config": ds_config})()
        self.state = type("State", (), {"deepspeed_plugin": plugin})()

    def prepare(self, module, optimizer):
        return module, optimizer


@pytest.mark.parametrize("ds_config, message", [
    ({"gradient_accumulation_steps": 4}, r"set grad_accum=4 in the RR config"),
    ({"optimizer": {"type": "Adam"}}, "names an optimizer or scheduler"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, r"offload_param.device=cpu"),
])
def test_deepspeed_settings_the_trainer_owns_are_refused(ds_config, message):
    from circuit_breakers.training.zero import ZeroEngine

    with pytest.raises(ConfigError, match=message):
        ZeroEngine(_FakeAccelerator(ds_config), torch.nn.Linear(2, 2), None, RRConfig(model="x", batch_size=8), 2)


def test_rr_config_fills_deepspeeds_batch_and_clipping():
    from circuit_breakers.training.zero import ZeroEngine

    ds_config = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    engine = ZeroEngine(_FakeAccelerator(ds_config), torch.nn.Linear(2, 2), None,
                        RRConfig(model="x", batch_size=8, grad_accum=2, max_grad_norm=0.5), 2)
    # DeepSpeed sees one micro-batch per process and step: the trainer splits it into grad_accum itself.
    assert ds_config == {"gradient_accumulation_steps": 1, "gradient_clipping": 0.5, "train_batch_size": 8,
                         "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    assert engine.stage == 2 and not engine.sharded
