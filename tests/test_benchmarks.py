"""benchmarks/train_step.py on the tiny shape: both variants run and their step-1 losses agree."""
import importlib.util
import json
import sys

import torch
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_tiny(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: seconds even when other jobs share the CPU
        code = bench.main(["--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--batch-size", "2", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    assert [row["variant"] for row in result["rows"]] == ["reference", "trainer"]
    check = result["loss_check"]
    assert check["checked"] and check["agree"]
    assert check["rerouting_loss_step1_relative_diff"] < 1e-3 and check["retain_loss_step1_relative_diff"] < 1e-3
    ref, fast = result["rows"]
    # The perturbed adapter makes the losses non-trivial (a fresh one gives L_s = 1, L_r = 0).
    assert 0 < ref["rerouting_loss_step1"] < 1 and ref["retain_loss_step1"] > 0
    for row in result["rows"]:
        assert row["real_tokens_per_s"] > 0 and row["useful_tflops"] > 0 and row["step_s_median"] > 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "trainer" in printed and "loss agreement" in printed


def test_reference_circuit_breaker_padding():
    bench = _load_script()
    item = bench.TokenizedExample((1, 5, 6, 7, 8, 9), 2)
    batch = bench.reference_cb_batch([item], 4)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 5, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]
    cb, retain = bench.synthesise_items(50, 1.0, 1000, seed=3)
    half, retain_length = bench.padded_lengths(1.0)
    assert (half, retain_length) == (512, 1024)
    assert all(20 <= x.response_start <= 80 and 150 <= x.length - x.response_start <= 450 for x in cb)
    assert all(100 <= x.length <= 1000 and 0.05 * x.length <= x.response_start <= 0.35 * x.length for x in retain)
