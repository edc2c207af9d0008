"""benchmarks/load.py against its embedded tiny model: every request answered, figures written."""
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def _load_benchmark(name: str):
    """benchmarks/load.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_load_benchmark_tiny(tmp_path, capsys):
    bench = _load_benchmark("bench_load")
    out = tmp_path / "load.json"
    threads = torch.get_num_threads()
    try:
        code = bench.main(["--clients", "4", "--requests", "2", "--max-tokens", "4", "--threads", "1",
                           "--batch-wait-ms", "50", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["requests_ok"] == 8 and result["errors"] == 0 and result["not_sent"] == 0
    assert result["completion_tokens"] == 8 * 4  # a random model never ends early; every answer counted
    assert result["latency_p50_s"] <= result["latency_p99_s"]
    assert result["server_batches"] < 8  # concurrent clients were batched
    assert "req/s" in capsys.readouterr().out
    assert bench.percentile([1, 2, 3, 4], 50) == 2 and bench.percentile([1, 2, 3, 4], 99) == 4


def test_load_benchmark_hostile_mode(tmp_path, capsys):
    bench = _load_benchmark("bench_load_hostile")
    out = tmp_path / "hostile.json"
    threads = torch.get_num_threads()
    try:
        code = bench.main(["--hostile", "--clients", "4", "--requests", "2", "--max-tokens", "4", "--threads", "1",
                           "--rounds", "2", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    # the longest request the server takes: the tiny model's 1024 positions, a quarter of them to generate
    assert result["hostile_max_tokens"] == 256 and result["hostile_prompt_tokens"] == 768
    assert len(result["rounds"]) == 2
    for pair in result["rounds"]:
        for run in ("without", "with"):
            assert pair[run]["requests_ok"] == 8 and pair[run]["errors"] == 0 and pair[run]["rejected"] == 0
        assert "hostile_status" not in pair["without"]
        assert pair["with"]["hostile_status"] == 200 and pair["with"]["hostile_completion_tokens"] == 256
        assert 700 <= pair["with"]["hostile_prompt_tokens"] <= 768  # as many words as fit, after the chat template
        assert pair["ratio_p99"] == pair["with"]["latency_p99_s"] / pair["without"]["latency_p99_s"]
    assert result["ratio_p99"] == statistics.median(pair["ratio_p99"] for pair in result["rounds"])
    printed = capsys.readouterr().out
    assert "with / without (median of 2 rounds): p50" in printed and "hostile request: 200" in printed
