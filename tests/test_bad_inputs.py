"""Issue 14: no input ends in a traceback. Every bad command line below exits with a status and one message
on stderr that names what was wrong, before anything heavy loads, and leaves no empty --out behind; Ctrl-C
and SIGTERM stop training with a line saying where the last checkpoint is."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from circuit_breakers.cli import main
from circuit_breakers.data import write_jsonl
from circuit_breakers.models import embedded_gguf_path
from circuit_breakers.training.checkpoint import STATE_FILE, list_checkpoints, resolve_resume

from .helpers import launch_env, make_chat_tokenizer, make_tiny_model

OUT = "{tmp}/out/run"  # does not exist: a failed command must leave neither it nor out/ behind
TINY = ["target_layers=[2,3]", "steps=3", "batch_size=2", "max_length=64"]  # a valid tiny-model config


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in this process: (exit status, stderr). argparse's errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def _message(err: str) -> str:
    """The command's one message: the last line of stderr, and the only one of its own (transformers may draw
    a loading bar before it)."""
    ours = [line for line in err.splitlines() if line.startswith("circuit-breakers:")]
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0], err
    return ours[0]


def _records(n: int, *, harmful: bool) -> list[dict]:
    if harmful:
        return [{"prompt": f"How do I bake bread {i}?", "output": "Sure, here is a simple recipe."} for i in range(n)]
    return [{"request": f"Explain the water cycle {i}", "response": "Water evaporates and rains."} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Every input the cases name, built once: a tiny checkpoint, data files, broken GGUF files, ..."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = make_chat_tokenizer()
    model = root / "tiny"
    make_tiny_model("llama", vocab_size=len(tokenizer), layers=4).save_pretrained(model)
    tokenizer.save_pretrained(model)
    write_jsonl(root / "harmful.jsonl", _records(4, harmful=True))
    write_jsonl(root / "benign.jsonl", _records(4, harmful=False))
    (root / "bad-line.jsonl").write_text('{"request": "a", "response": "b"}\n{not json\n')
    (root / "bad-field.jsonl").write_text('{"request": "a", "response": 7}\n')
    (root / "unreadable-config").mkdir()
    (root / "unreadable-config" / "config.json").write_text("{}")  # passes the checks; transformers refuses it
    (root / "no-config").mkdir()
    (root / "bad-recipe.yaml").write_text("steps: -5\n")
    (root / "recipe.yaml").write_text("steps: 3\n")

    shipped = embedded_gguf_path().read_bytes()
    (root / "head-1mb.gguf").write_bytes(shipped[:2**20])  # ends inside the metadata (the tokenizer)
    (root / "head-5mb.gguf").write_bytes(shipped[:5 * 2**20])  # whole header, tensor data cut short
    (root / "garbage.gguf").write_bytes(bytes(range(256)) * 64)
    (root / "version-9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(64))
    _write_gguf(root / "unknown-arch.gguf")
    return {"root": str(root), "model": str(model)} | {
        p.stem.replace("-", "_"): str(p) for p in root.iterdir() if p.suffix in (".jsonl", ".gguf", ".yaml")} | {
        "unreadable_config": str(root / "unreadable-config"), "no_config": str(root / "no-config")}


def _write_gguf(path: Path) -> None:
    """A well-formed GGUF file of an architecture transformers does not know."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "nonesuch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(autouse=True)
def no_gpu_and_own_cache(monkeypatch, tmp_path):
    """The same on every machine: no GPU visible; GGUF conversions (none should happen) in tmp_path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CIRCUIT_BREAKERS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def forbid_model_loading(monkeypatch):
    """A case that must fail before any model loads fails the test if one does."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def _train(*args: str) -> list[str]:
    return ["train", "--out", OUT, "--no-progress", *args]


def _data(cb: str = "{harmful}", retain: str = "{benign}") -> list[str]:
    return [f"circuit_breaker_data=[{cb}]", f"retain_data=[{retain}]"]


# (id, argv, exit status, fragments stderr must hold). Placeholders: the `files` fixture's names, {tmp}.
CASES = [
    # ---- GGUF files: checked from the header, before anything loads
    ("gguf-truncated-metadata", _train("--model", "{head_1mb}", *TINY), 2, ["head-1mb.gguf", "truncated"]),
    ("gguf-truncated-tensor-data", _train("--model", "{head_5mb}", *TINY), 2,
     ["head-5mb.gguf", "truncated", "token_embd.weight", "past the end of the file"]),
    ("gguf-garbage", _train("--model", "{garbage}", *TINY), 2, ["garbage.gguf", "not a GGUF file"]),
    ("gguf-unknown-version", _train("--model", "{version_9}", *TINY), 2, ["version-9.gguf", "GGUF version 9"]),
    ("gguf-missing", _train("--model", "{tmp}/nope.gguf", *TINY), 2, ["nope.gguf", "no such GGUF file"]),
    ("eval-gguf-truncated", ["eval", "--model", "{head_1mb}", "--out", OUT], 2, ["head-1mb.gguf", "truncated"]),
    # ---- model paths
    ("model-missing-relative", _train("--model", "./no/such/model", *TINY), 2,
     ["./no/such/model", "no such directory or file"]),
    ("model-missing-absolute", _train("--model", "{tmp}/missing-model", *TINY), 2, ["no such directory or file"]),
    ("model-missing-home", _train("--model", "~/no-such-cb-model-dir", *TINY), 2, ["no such directory or file"]),
    ("model-dir-without-config", _train("--model", "{no_config}", *TINY), 2, ["no-config", "config.json"]),
    ("probe-model-missing", ["probe", "train", "--model", "./nope/model", "--out", OUT], 2,
     ["no such directory or file"]),
    ("data-build-model-missing", ["data", "build", "--model", "./nope/model", "--out", OUT], 2,
     ["no such directory or file"]),
    # ---- devices
    ("device-cuda-without-gpu", _train("--model", "{model}", *TINY, "device=cuda"), 2, ["'cuda'", "no CUDA GPU"]),
    ("device-cuda-index", _train("--model", "{model}", *TINY, "device=cuda:3"), 2, ["'cuda:3'", "no CUDA GPU"]),
    ("device-unknown", _train("--model", "{model}", *TINY, "device=banana"), 2, ["'banana'", "expected auto, cpu"]),
    ("eval-device-cuda", ["eval", "--model", "{model}", "--device", "cuda", "--out", OUT], 2, ["no CUDA GPU"]),
    ("probe-device-cuda", ["probe", "train", "--model", "{model}", "--device", "cuda", "--out", OUT], 2,
     ["no CUDA GPU"]),
    ("demo-device-cuda", ["demo", "--out", OUT, "device=cuda"], 2, ["no CUDA GPU"]),
    # ---- config values: every numeric field has a range; errors name the command line
    ("max-length-1", _train("--model", "{model}", *TINY, "max_length=1"), 2,
     ["command line", "max_length", ">= 16", "request and a response"]),
    ("frozen-cache-negative", _train("--model", "{model}", *TINY, "frozen_cache_gb=-1"), 2,
     ["command line", "frozen_cache_gb", ">= 0"]),
    ("lr-nan", _train("--model", "{model}", *TINY, "lr=.nan"), 2, ["command line", "lr: expected a number > 0"]),
    ("steps-zero", _train("--model", "{model}", *TINY, "steps=0"), 2, ["steps: expected an integer >= 1"]),
    ("seed-negative", _train("--model", "{model}", *TINY, "seed=-1"), 2, ["seed"]),
    ("target-layer-0", _train("--model", "{model}", *TINY, "target_layers=[0]"), 2, ["target_layers", ">= 1"]),
    ("retain-weight-negative", _train("--model", "{model}", *TINY, "retain_weight=-2"), 2, ["retain_weight"]),
    ("wrong-type-over-recipe", _train("--config", "{recipe}", "--model", "{model}", "lr=fast"), 2,
     ["command line", "lr: expected float"]),
    ("unknown-key", _train("--model", "{model}", "learning_rate=1"), 2,
     ["command line", "unknown key(s) learning_rate"]),
    ("not-key-value", _train("--model", "{model}", "lr"), 2, ["command line", "'lr': expected key=value"]),
    ("recipe-bad-value", _train("--config", "{bad_recipe}"), 2, ["bad-recipe.yaml", "steps"]),
    ("recipe-unknown", _train("--config", "llama-9000"), 2, ["llama-9000", "llama3-8b"]),
    ("demo-max-length-1", ["demo", "--out", OUT, "max_length=1"], 2, ["command line", "max_length"]),
    # ---- data files: read before the model loads
    ("data-missing", _train("--model", "{model}", *TINY, *_data(cb="{tmp}/missing.jsonl")), 2,
     ["missing.jsonl", "file not found"]),
    ("data-bad-json-line", _train("--model", "{model}", *TINY, *_data(retain="{bad_line}")), 2,
     ["bad-line.jsonl line 2", "invalid JSON"]),
    ("data-bad-field", _train("--model", "{model}", *TINY, *_data(cb="{bad_field}")), 2,
     ["bad-field.jsonl line 1", '"response"']),
    ("data-empty-set", _train("--model", "{model}", *TINY, "circuit_breaker_data=[]"), 2,
     ["circuit_breaker_data", "no items"]),
    ("data-unknown-builtin", _train("--model", "{model}", *TINY, "circuit_breaker_data=[builtin:nope]"), 2,
     ["builtin:nope", "built-in sets"]),
    ("demo-data-missing", ["demo", "--out", OUT, "retain_data=[{tmp}/gone.jsonl]"], 2, ["gone.jsonl", "not found"]),
    ("probe-data-missing", ["probe", "train", "--model", "{model}", "--positive", "{tmp}/gone.jsonl", "--out", OUT],
     2, ["gone.jsonl", "not found"]),
    # ---- numeric options: refused by the parser
    ("eval-limit-0", ["eval", "--model", "{model}", "--limit", "0", "--out", OUT], 2,
     ["--limit", "expected an integer >= 1, got 0"]),
    ("eval-limit-negative", ["eval", "--model", "{model}", "--limit", "-3", "--out", OUT], 2, ["--limit"]),
    ("eval-max-new-tokens-0", ["eval", "--model", "{model}", "--max-new-tokens", "0", "--out", OUT], 2,
     ["--max-new-tokens"]),
    ("data-build-limit-0", ["data", "build", "--limit", "0", "--out", OUT], 2, ["--limit", ">= 1"]),
    ("probe-fpr", ["probe", "train", "--fpr", "1.5", "--out", OUT], 2, ["--fpr", "[0, 1)"]),
    ("probe-max-length", ["probe", "train", "--max-length", "1", "--out", OUT], 2, ["--max-length", ">= 16"]),
    # ---- other eval and probe inputs
    ("eval-behaviors-missing", ["eval", "--model", "{model}", "--behaviors", "{tmp}/none.jsonl", "--out", OUT], 2,
     ["none.jsonl"]),
    ("eval-unknown-attack-field", ["eval", "--model", "{model}", "--attack", "bogus.x=1", "--out", OUT], 2,
     ["--attack bogus.x=1", "unknown attack"]),
    ("probe-eval-missing-probe", ["probe", "eval", "--model", "{model}", "--probe", "{tmp}/none"], 2,
     ["probe.json", "missing"]),
    ("resume-not-a-run", ["train", "--resume", "{tmp}"], 2, ["--resume", "neither a run directory"]),
]


def _format(argv: list[str], files: dict, tmp_path: Path) -> list[str]:
    return [arg.format(tmp=tmp_path, **files) for arg in argv]


@pytest.mark.usefixtures("forbid_model_loading")
@pytest.mark.parametrize("argv, code, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_message_before_anything_loads(argv, code, fragments, files, tmp_path, capsys):
    got, err = run_cli(_format(argv, files, tmp_path), capsys)
    assert got == code, err
    for fragment in fragments:
        assert fragment.format(tmp=tmp_path) in err, (fragment, err)
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # neither --out nor its parent was left behind
    assert not (tmp_path / "cache").exists()  # no GGUF file was converted


@pytest.mark.parametrize("model, fragments", [
    ("{unreadable_config}", ["unreadable-config", "cannot load model"]),
    ("{unknown_arch}", ["unknown-arch.gguf", "transformers cannot load this GGUF file", "nonesuch"]),
], ids=["config-json-transformers-refuses", "gguf-architecture-transformers-lacks"])
def test_a_model_that_fails_to_load_leaves_no_empty_out(model, fragments, files, tmp_path, capsys):
    """These pass every check and fail inside transformers, after --out was created: it is removed again."""
    code, err = run_cli(_format(_train("--model", model, *TINY), files, tmp_path), capsys)
    assert code == 2, err
    assert all(fragment in err for fragment in fragments), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("forbid_model_loading")
@pytest.mark.parametrize("below", ["", "run"], ids=["out-is-a-file", "out-below-a-file"])
def test_out_that_cannot_be_a_directory_is_refused_and_the_file_left_alone(below, files, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    out = taken / below if below else taken
    code, err = run_cli(_format(["train", "--out", str(out), "--model", "{model}", *TINY], files, tmp_path), capsys)
    assert code == 2 and f"output directory {out} is not writable" in err and "Traceback" not in err
    assert taken.read_text() == "mine"


@pytest.mark.usefixtures("forbid_model_loading")
def test_a_failed_command_keeps_an_out_that_existed(files, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    code, _ = run_cli(_format(["train", "--out", str(out), "--model", "{model}", "max_length=1"], files, tmp_path),
                      capsys)
    assert code == 2 and out.is_dir()  # only what the command itself created is removed


def test_interrupted_training_names_the_last_checkpoint(files, tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt in step 3 (as Ctrl-C raises it): exit 130 and one line with the checkpoint and the
    command that resumes; the checkpoint it names is complete."""
    from circuit_breakers.training import RRTrainer

    step = RRTrainer.step

    def interrupted_at_3(self, n, *args):
        if n == 3:
            raise KeyboardInterrupt
        return step(self, n, *args)
    monkeypatch.setattr(RRTrainer, "step", interrupted_at_3)
    out = tmp_path / "run"
    code, err = run_cli(_format(["train", "--out", str(out), "--model", "{model}", "--no-progress", *TINY,
                                 "steps=5", "save_every=1", *_data()], files, tmp_path), capsys)
    assert code == 130
    checkpoint = out / "checkpoints" / "step-2"
    assert _message(err) == (f"circuit-breakers: interrupted (SIGINT) in training step 3; the last checkpoint is "
                             f"{checkpoint}; continue with `circuit-breakers train --resume {out}`")
    assert (checkpoint / STATE_FILE).is_file() and resolve_resume(out) == (out, checkpoint)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-")]


def test_a_lost_interrupt_still_stops_training_a_step_later(files, tmp_path, capsys, monkeypatch):
    """A real SIGINT in step 3 whose KeyboardInterrupt is swallowed on the way (as C code that clears Python
    errors would): training stops before step 4, naming step 3's checkpoint, instead of running on."""
    from circuit_breakers.training import RRTrainer

    step = RRTrainer.step

    def interrupted_and_swallowed_at_3(self, n, *args):
        result = step(self, n, *args)
        if n == 3:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises here
            except KeyboardInterrupt:
                pass
            else:
                pytest.fail("the SIGINT handler did not run")
        return result
    monkeypatch.setattr(RRTrainer, "step", interrupted_and_swallowed_at_3)
    out = tmp_path / "run"
    code, err = run_cli(_format(["train", "--out", str(out), "--model", "{model}", "--no-progress", *TINY,
                                 "steps=6", "save_every=1", *_data()], files, tmp_path), capsys)
    assert code == 130
    assert _message(err) == (f"circuit-breakers: interrupted (SIGINT) in training step 4; the last checkpoint is "
                             f"{out / 'checkpoints' / 'step-3'}; continue with `circuit-breakers train --resume {out}`")
    assert not (out / "model").exists()


# ---------------------------------------------------------------- real signals, in a subprocess


def _start_training(tmp_path: Path, files: dict) -> tuple[subprocess.Popen, Path]:
    """`circuit-breakers train` on the tiny model, long enough to be interrupted; returns once a checkpoint
    exists."""
    out = tmp_path / "run"
    argv = _format(["train", "--out", str(out), "--model", "{model}", "--no-progress", *TINY, "steps=100000",
                    "save_every=2", "keep_checkpoints=1", *_data()], files, tmp_path)
    # PYTHONFAULTHANDLER: a run that hangs is sent SIGABRT and its threads' stacks reach the failure message.
    proc = subprocess.Popen([sys.executable, "-m", "circuit_breakers", *argv],
                            env={**launch_env(), "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not reach a checkpoint: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return proc, out


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_stops_training_with_the_checkpoint_to_resume(signum, name, files, tmp_path):
    proc, out = _start_training(tmp_path, files)
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"{name} did not stop training within 60 s; its stacks:\n{proc.communicate()[1][-6000:]}")
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    line = _message(err)
    assert line.startswith(f"circuit-breakers: interrupted ({name}) in training step ")
    checkpoint = Path(line.split("the last checkpoint is ")[1].split(";")[0])
    assert checkpoint.parent == out / "checkpoints" and (checkpoint / STATE_FILE).is_file()
    assert line.endswith(f"continue with `circuit-breakers train --resume {out}`")
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-")]


def test_a_second_signal_exits_at_once_even_while_the_main_thread_is_stuck(tmp_path):
    """The main thread cannot run Python's handlers (SIGINT blocked in it, as a long C call would delay them):
    the first Ctrl-C waits, the second exits at once with 130."""
    # "ready" comes from a timer thread once the main thread is inside sleep: a signal sent while the main thread
    # still ran bytecode would be handled there at once (a first Ctrl-C's right behaviour, not this test's case).
    script = textwrap.dedent("""
        import signal, sys, threading, time
        from circuit_breakers.stopping import StopSignals
        with StopSignals():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the watcher thread still receives it
            threading.Timer(1.0, lambda: print("ready", flush=True)).start()
            time.sleep(60)
        print("not interrupted", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first one waits for the main thread
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and time.monotonic() - started < 10
    assert "SIGINT again: exiting at once" in err and "Traceback" not in err and "not interrupted" not in out
