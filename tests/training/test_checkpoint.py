"""Never lose a run: checkpoints every K steps, resuming after SIGKILL to the same adapter, NaN stops
with the last good checkpoint kept, and an unusable output directory fails before training."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuit_breakers.training import checkpoint as ckpt
from circuit_breakers.cli import main
from circuit_breakers.config import ConfigError, RRConfig
from circuit_breakers.data import write_jsonl
from circuit_breakers.training import RRTrainer

from ..helpers import make_tiny_model, tokenized_items

REPO = Path(__file__).resolve().parents[2]


def checkpointing_trainer(chat_tokenizer, **overrides) -> RRTrainer:
    settings = dict(model="tiny-test-model", target_layers=[2, 3], steps=6, batch_size=2, lr=1e-2, max_length=64,
                    save_every=2)
    settings.update(overrides)
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4)
    return RRTrainer(RRConfig(**settings), model=model, tokenizer=chat_tokenizer,
                     circuit_breaker_items=tokenized_items(chat_tokenizer, 6, harmful=True),
                     retain_items=tokenized_items(chat_tokenizer, 6, harmful=False), progress=False)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- checkpoints and in-process resume


def test_checkpoints_are_complete_rotated_and_resume_exactly(tmp_path, chat_tokenizer):
    full = tmp_path / "full"
    checkpointing_trainer(chat_tokenizer, keep_checkpoints=2).train(full)
    assert [p.name for p in ckpt.list_checkpoints(full)] == ["step-4", "step-6"]  # step-2 rotated out
    assert not [p.name for p in (full / "checkpoints").iterdir() if p.name.startswith(".")]
    newest = full / "checkpoints" / "step-6"
    assert {p.name for p in newest.iterdir()} == {"adapter", "optimizer.pt", "rng.json", "trainer_state.json"}
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["batches_drawn"] == {"circuit_breaker": 6, "retain": 6}
    assert state["config"]["save_every"] == 2
    # The frozen-state cache is saved in append-only segments the checkpoints share.
    segments = state["frozen_cache"][0]
    assert segments["circuit_breaker"] and segments["retain"]
    assert all((full / "checkpoints" / "frozen-cache" / "rank0" / f).is_file() for f in sum(segments.values(), []))
    # The checkpoint's adapter is an ordinary PEFT adapter: at the last step it is the final one.
    final = _adapter(full / "adapter")
    assert all(torch.equal(final[k], v) for k, v in _adapter(newest / "adapter").items())

    # Resume from step 4 of a copy whose later state is gone (LoRA dropout is on: RNG states matter).
    part = tmp_path / "part"
    part.mkdir()
    (part / "config.yaml").write_text((full / "config.yaml").read_text())
    (part / "train_log.jsonl").write_text((full / "train_log.jsonl").read_text() + '{"step": 7, "ret')
    import shutil
    shutil.copytree(full / "checkpoints", part / "checkpoints", ignore=shutil.ignore_patterns("step-6"))
    result = checkpointing_trainer(chat_tokenizer, keep_checkpoints=2).train(part, resume=True)
    assert [r["step"] for r in result.log] == [1, 2, 3, 4, 5, 6]
    assert _log_steps(part) == [1, 2, 3, 4, 5, 6]  # steps 5-6 and the torn line replaced, none twice
    resumed = _adapter(part / "adapter")
    assert resumed.keys() == final.keys()
    assert max((resumed[k] - final[k]).abs().max().item() for k in final) <= 1e-6


def test_resume_refuses_another_config_or_other_data(tmp_path, chat_tokenizer):
    out = tmp_path / "run"
    checkpointing_trainer(chat_tokenizer, steps=2).train(out)
    with pytest.raises(ConfigError, match=r"config differs in lr"):
        checkpointing_trainer(chat_tokenizer, steps=2, lr=5e-3).train(out, resume=True)
    trainer = checkpointing_trainer(chat_tokenizer, steps=2)
    trainer.cb_items = trainer.cb_items[:-1]
    with pytest.raises(ConfigError, match="training data differ"):
        trainer.train(out, resume=True)
    # Harmless keys may change; others may not (CLI side).
    with pytest.raises(ConfigError, match="lr cannot change"):
        ckpt.resume_config(out, ckpt.list_checkpoints(out)[-1], {"lr": 1.0})
    assert ckpt.resume_config(out, ckpt.list_checkpoints(out)[-1], {"save_every": 7}).save_every == 7


# ---------------------------------------------------------------- NaN


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, chat_tokenizer):
    trainer = checkpointing_trainer(chat_tokenizer, steps=6, save_every=2)
    calls = {"n": 0}
    real = trainer.retain_terms

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, cos = real(*args, **kwargs)
        return (loss * float("nan"), cos) if calls["n"] == 3 else (loss, cos)  # step 3: one retain batch a step
    trainer.retain_terms = poisoned
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        trainer.train(out)
    message = str(err.value)
    assert "step 3" in message and "retain_loss=nan" in message
    assert str(out / "checkpoints" / "step-2") in message and "--resume" in message
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-2"]
    good = _adapter(out / "checkpoints" / "step-2" / "adapter")
    assert all(torch.isfinite(v).all() for v in good.values())
    assert _log_steps(out) == [1, 2]  # the NaN step is not logged
    assert not (out / "model").exists() and not (out / "adapter").exists()


# ---------------------------------------------------------------- before training


def test_output_dir_that_is_not_writable_fails_before_training(tmp_path, chat_tokenizer, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "run"
    trainer = checkpointing_trainer(chat_tokenizer)
    with pytest.raises(ckpt.OutputDirError, match=f"output directory {out} is not writable"):
        trainer.train(out)
    assert not trainer.optimizer.state  # no step was taken
    # The CLI checks before loading any model.
    assert main(["train", "--out", str(out), "--model", "/nonexistent/model"]) == 2
    assert f"output directory {out} is not writable" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes through permission bits
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        with pytest.raises(ckpt.OutputDirError, match="not writable"):
            ckpt.check_writable(readonly)


def test_too_little_free_disk_fails_before_training_with_the_sizes(tmp_path, chat_tokenizer, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 5000, 5000))
    trainer = checkpointing_trainer(chat_tokenizer, steps=6, save_every=2)
    out = tmp_path / "run"
    with pytest.raises(ckpt.OutputDirError) as err:
        trainer.train(out)
    message = str(err.value)
    adapter = ckpt.state_bytes(trainer.trainable)
    assert f"output directory {out} has 4.9 KiB free" in message
    assert f"2 checkpoint(s) of {ckpt.human_size(3 * adapter + 2**16)}" in message
    assert f"final adapter {ckpt.human_size(adapter)}" in message and "merged model" in message
    assert not trainer.optimizer.state and not (out / "train_log.jsonl").exists()


# ---------------------------------------------------------------- a real kill


@pytest.fixture
def tiny_run_inputs(tmp_path, chat_tokenizer):
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4).save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    harmful = [{"prompt": f"How do I bake bread {i}?", "output": "Sure, here is a simple recipe for bread. " * (1 + i % 3)}
               for i in range(8)]
    benign = [{"request": f"Explain the water cycle {i}" + " briefly" * (i % 3), "response": "Water evaporates."}
              for i in range(8)]
    write_jsonl(tmp_path / "harmful.jsonl", harmful)
    write_jsonl(tmp_path / "benign.jsonl", benign)
    return ["--model", str(model_dir), "--no-progress", "target_layers=[2,3]", "batch_size=2", "lr=1e-2",
            "max_length=64", f"circuit_breaker_data=[{tmp_path / 'harmful.jsonl'}]",
            f"retain_data=[{tmp_path / 'benign.jsonl'}]", "save_every=2"]


def test_resume_after_sigkill_reaches_the_uninterrupted_adapter(tmp_path, tiny_run_inputs):
    steps = 24
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "circuit_breakers", "train", "--out", str(killed),
                             *tiny_run_inputs, f"steps={steps}"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.list_checkpoints(killed):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model").exists(), "the run finished before it was killed: raise `steps`"
    killed_at = json.loads((ckpt.list_checkpoints(killed)[-1] / "trainer_state.json").read_text())["step"]
    assert killed_at < steps

    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    full = tmp_path / "full"
    assert main(["train", "--out", str(full), *tiny_run_inputs, f"steps={steps}"]) == 0

    assert _log_steps(killed) == list(range(1, steps + 1))  # continued: no step twice, none missing
    got, want = _adapter(killed / "adapter"), _adapter(full / "adapter")
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    assert RRConfig.load(killed / "config.yaml") == RRConfig.load(full / "config.yaml")


# ---------------------------------------------------------------- no pickles


class _RunsCode:
    """What a hostile checkpoint would hold: unpickling it calls `touch` on the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_hold_no_pickle_and_a_pickle_in_one_is_refused_unrun(tmp_path, chat_tokenizer):
    out = tmp_path / "run"
    checkpointing_trainer(chat_tokenizer, steps=4).train(out)
    checkpoint = out / "checkpoints" / "step-2"
    json.loads((checkpoint / "rng.json").read_text())  # plain JSON
    torch.load(checkpoint / "optimizer.pt", weights_only=True)  # tensors and plain containers only

    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCode(marker)}, checkpoint / "optimizer.pt")
    with pytest.raises(ConfigError, match=r"optimizer.pt: holds objects other than tensors .* not loaded"):
        checkpointing_trainer(chat_tokenizer, steps=4).train(out, resume=checkpoint)
    assert not marker.exists()


def test_a_checkpoint_with_the_old_pickled_rng_file_is_refused(tmp_path, chat_tokenizer):
    out = tmp_path / "run"
    checkpointing_trainer(chat_tokenizer, steps=4).train(out)
    checkpoint = out / "checkpoints" / "step-2"
    (checkpoint / "rng.json").unlink()
    torch.save({"world_size": 1, "states": []}, checkpoint / "rng.pt")
    with pytest.raises(ConfigError, match=r"older circuit-breakers: its RNG states are a pickle \(rng.pt\)"):
        checkpointing_trainer(chat_tokenizer, steps=4).train(out, resume=checkpoint)


def test_rng_states_round_trip_through_json():
    import random

    import numpy as np

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
