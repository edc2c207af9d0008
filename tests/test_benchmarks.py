"""The benchmark scripts on tiny models: train_step.py (both variants run, their step-1 losses agree),
recipe_robustness.py, prompt_cache.py and padding.py."""
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


def test_recipe_robustness_on_a_tiny_model(tmp_path, chat_tokenizer):
    """Two seeds' worth of runs in fresh processes under two numerical variants; the table has every
    target layer, and the seeded start makes the first step the same under both variants."""
    import subprocess

    import yaml

    from .helpers import make_tiny_model

    original = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=3).save_pretrained(original)
    chat_tokenizer.save_pretrained(original)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(original), "target_layers": [1, 2], "steps": 2, "batch_size": 2,
                                      "max_length": 256, "lr": 1e-2, "save_every": 0, "seeded_start": "target",
                                      "retain_distance": "relative_l2", "retain_normalization": "masked_mean"}))
    out = tmp_path / "runs"
    script = SCRIPT.parent / "recipe_robustness.py"
    done = subprocess.run([sys.executable, str(script), "--config", str(recipe), "--seeds", "5",
                           "--variants", "native/1,avx2/1", "--capability", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max |difference| of the original model's hidden states from native/1" in done.stdout
    assert "| harmful L1 | harmful L2 | benign L1 | benign L2 |" in done.stdout
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["spec"]["variant"] for r in runs] == ["native/1", "avx2/1"]
    for run in runs:
        assert run["threads"] == 1 and run["config"]["seed"] == 5 and len(run["log"]) == 2
        assert set(run["cosine"]["harmful"]["per_layer"]) == {"1", "2"}
        assert set(run["verdict"]["layers"]) == {"1", "2"}
    assert runs[1]["cpu_capability"] == "AVX2"
    assert runs[0]["capability"]["over_refusal"]["model"]["borderline"]["n"] == 27  # the whole test split
    assert "| borderline not answered | benign token F1 |" in done.stdout
    assert "| 100.0% |" in done.stdout  # the first step's signs agree under both variants
    # A rerun with the same spec reuses the finished runs.
    again = subprocess.run([sys.executable, str(script), "--config", str(recipe), "--seeds", "5",
                            "--variants", "native/1,avx2/1", "--capability", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "start seed" not in again.stdout
    assert (out / "seed5-native-t1" / "capability_samples.jsonl").is_file()  # raw material for hand labels
    assert not (out / "seed5-native-t1" / "model").exists()  # models are kept only when asked


def test_recipe_robustness_of_an_agent_recipe_measures_the_tool_use_items(tmp_path):
    """--agent: the agent recipe's data on a tiny tool-using model; cosines on the held-out tool-use items that
    `demo --agent` takes (40 harmful, 40 benign), no borderline-safe column."""
    import subprocess

    from .helpers import make_tiny_model, make_tool_tokenizer

    tokenizer = make_tool_tokenizer("hermes")
    subject = tmp_path / "subject"
    make_tiny_model("llama", vocab_size=len(tokenizer), layers=3).save_pretrained(subject)
    tokenizer.save_pretrained(subject)
    out = tmp_path / "runs"
    # The tiny byte-level tokenizer spends about a token per character: the tool prompts need the room.
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "recipe_robustness.py"), "--config", "smollm2-135m-agent",
                           "--agent", "--seeds", "5", "--variants", "native/1", "--out", str(out), f"model={subject}",
                           "steps=2", "batch_size=2", "target_layers=[1]", "max_length=4096"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| harmful L1 | benign L1 | cos<0.5 at L1 |" in done.stdout and "borderline" not in done.stdout
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["spec"]["agent"] and run["cosine"]["harmful"]["items"] == run["cosine"]["benign"]["items"] == 40
    assert set(run["verdict"]["layers"]) == {"1"} and run["verdict"]["borderline_kept"] is None


def test_prompt_cache_benchmark_on_a_tiny_model(capsys):
    """The agent eval (direct, then forced_call) with the prompt caches off and on: same outputs."""
    path = SCRIPT.parent / "prompt_cache.py"
    spec = importlib.util.spec_from_file_location("bench_prompt_cache", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--limit", "4", "--max-new-tokens", "3"])
    printed = capsys.readouterr().out
    assert "off (prompt_cache_gb 0.0)" in printed and "on (prompt_cache_gb 1.0)" in printed
    assert "4 behaviours x (direct, forced_call), max_new_tokens 3" in printed
    assert "outputs differing 0 of 8" in printed


def test_padding_counts_what_a_padded_batch_computes():
    spec = importlib.util.spec_from_file_location("bench_padding", SCRIPT.parent / "padding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lengths = [10, 10, 10, 10, 2, 2, 2, 2]
    grouped = bench.padding(lengths, 4, seed=0, steps=2, group_by_length=True)
    assert grouped == {"real": 48, "computed": 48, "padding": 0.0}  # one batch of 10s, one of 2s
    mixed = bench.padding([10, 2], 2, seed=0, steps=1, group_by_length=False)
    assert mixed == {"real": 12, "computed": 20, "padding": 0.4}
