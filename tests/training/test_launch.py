"""`circuit-breakers train --accelerate-config NAME`: the shipped accelerate configs, the command it
re-executes, and what the trainer makes of each config (from the environment accelerate's own launcher
sets up for it)."""
import sys

import pytest

from circuit_breakers.cli import main
from circuit_breakers.training.cli import ACCELERATE_CONFIGS_DIR, accelerate_command, accelerate_config_path
from circuit_breakers.config import ConfigError
from circuit_breakers.training.parallel import parallel_mode

SHIPPED = {"single-gpu": "NO", "multi-gpu": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED",
           "deepspeed-zero3": "DEEPSPEED"}


def _launcher_env(name: str) -> dict:
    """The environment `accelerate launch --config_file NAME --num_processes 2` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(accelerate_config_path(name)), "--num_processes", "2",
                              "-m", "circuit_breakers", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return prepare_multi_gpu_env(args)
    return prepare_simple_launcher_cmd_env(args)[1]


def test_shipped_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    assert {p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")} == set(SHIPPED)
    for name, engine in SHIPPED.items():
        config = load_config_from_file(str(accelerate_config_path(name)))
        assert config.distributed_type.value == engine
        assert config.mixed_precision == "no"  # the trainer's dtype decides precision


@pytest.mark.parametrize("name, mode", [("single-gpu", "ddp"), ("multi-gpu", "ddp"), ("fsdp", "fsdp"),
                                        ("deepspeed-zero2", "deepspeed"), ("deepspeed-zero3", "deepspeed")])
def test_each_config_selects_a_parallel_mode(name, mode):
    """(single-gpu and multi-gpu set no engine flag; with one process the trainer takes the plain path.)"""
    assert parallel_mode(_launcher_env(name)) == (mode, None)


def test_each_deepspeed_config_asks_for_its_zero_stage():
    for name, stage in (("deepspeed-zero2", "2"), ("deepspeed-zero3", "3")):
        assert _launcher_env(name)["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage


def test_offloading_and_zero3_init_are_refused():
    env = _launcher_env("deepspeed-zero3")
    for key, value, message in (("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu", "offloading"),
                                ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true", "zero3_init_flag")):
        with pytest.raises(ConfigError, match=message):
            parallel_mode({**env, key: value})
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        parallel_mode({**_launcher_env("fsdp"), "FSDP_OFFLOAD_PARAMS": "true"})


def test_launch_command_reexecs_the_same_train_command(tmp_path, monkeypatch, capsys):
    argv = ["train", "--accelerate-config", "multi-gpu", "--num-processes", "4", "--out", str(tmp_path / "o"),
            "--config", "smollm2-135m", "steps=3"]
    command = accelerate_command(argv, "multi-gpu", 4)
    assert command == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ACCELERATE_CONFIGS_DIR / "multi-gpu.yaml"), "--num_processes", "4",
                       "-m", "circuit_breakers", "train", "--out", str(tmp_path / "o"), "--config", "smollm2-135m",
                       "steps=3"]
    assert accelerate_command(["train", "--accelerate-config=fsdp", "--out", "o"], "fsdp")[-3:] == ["train", "--out", "o"]

    calls = []
    monkeypatch.setattr("circuit_breakers.training.cli.os.execv", lambda path, args: calls.append((path, args)))
    main(argv)
    assert calls == [(sys.executable, command)]
    assert "launching: " in capsys.readouterr().err and "--num_processes 4" in " ".join(command)


def test_launch_checks_the_config_and_the_name_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("circuit_breakers.training.cli.os.execv", lambda *a: pytest.fail("must not launch"))
    assert main(["train", "--accelerate-config", "multi-gpu", "--out", str(tmp_path), "learning_rate=1"]) == 2
    assert "unknown key(s) learning_rate" in capsys.readouterr().err
    assert main(["train", "--accelerate-config", "tpu-pod", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no shipped config of that name" in err and "deepspeed-zero3, fsdp, multi-gpu, single-gpu" in err


def test_deepspeed_configs_ask_for_the_extra_when_it_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"circuit-breakers\[deepspeed\]"):
        accelerate_command(["train", "--out", "o"], "deepspeed-zero2")
    accelerate_command(["train", "--out", "o"], "fsdp")  # no DeepSpeed needed


@pytest.mark.slow
def test_single_gpu_config_really_launches(tmp_path, chat_tokenizer):
    """Through accelerate's launcher for real (one process; on this CPU machine it trains on the CPU)."""
    import json
    import os
    import subprocess

    from circuit_breakers.data import write_jsonl

    from ..helpers import make_tiny_model

    model = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4).save_pretrained(model)
    chat_tokenizer.save_pretrained(model)
    write_jsonl(tmp_path / "h.jsonl", [{"prompt": f"How do I bake bread {i}?", "output": "Sure."} for i in range(4)])
    write_jsonl(tmp_path / "b.jsonl", [{"request": f"Explain rain {i}", "response": "Water."} for i in range(4)])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "circuit_breakers", "train", "--accelerate-config", "single-gpu",
                           "--out", str(out), "--model", str(model), "--no-progress", "steps=2", "batch_size=2",
                           "target_layers=[2,3]", "max_length=64", f"circuit_breaker_data=[{tmp_path / 'h.jsonl'}]",
                           f"retain_data=[{tmp_path / 'b.jsonl'}]"],
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching: " in proc.stderr and "accelerate.commands.launch" in proc.stderr
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "model" / "config.json").is_file()
