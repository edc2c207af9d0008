"""`circuit-breakers demo --agent` on a tiny random Llama with a Hermes tool template: teach, RR, self-check and
the evaluation end to end at a shrunken budget, the reuse of both models on a rerun, and its argument checks."""
import dataclasses
import json
from pathlib import Path

import pytest

from circuit_breakers import agent_demo
from circuit_breakers.cli import main

from .helpers import make_tiny_model, make_tool_tokenizer

# The tiny byte-level tokenizer spends about a token per character: the tool prompts need the room.
RR = ["steps=2", "batch_size=2", "target_layers=[1]", "max_length=4096", "dtype=float32", "device=cpu"]
TEACH = {"steps": 2, "batch_size": 2, "max_length": 4096}
BUDGET = dataclasses.replace(agent_demo.AGENT_EVAL, behaviors=3, max_new_tokens=4, capability_prompts=3,
                             diagnostics_items=2)


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent")
    base = root / "base"
    tokenizer = make_tool_tokenizer("hermes")
    make_tiny_model("llama", vocab_size=len(tokenizer), layers=3).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = root / "out"
    result = agent_demo.run_agent_demo(out, RR, base=str(base), teach=TEACH, eval_budget=BUDGET, progress=False)
    return base, out, result


@pytest.mark.slow
def test_agent_demo_teaches_circuit_breaks_and_measures_both_models(agent_run):
    _, out, result = agent_run
    assert (out / "subject" / "teach.json").is_file() and (out / "model" / "config.json").is_file()
    assert result["subject"] == str(out / "subject") and result["teach_seconds"] > 0 and result["train_seconds"] > 0
    # taught in the RR recipe's dtype, and recorded so (a subject taught in another dtype is not reused)
    assert json.loads((out / "subject" / "teach.json").read_text())["settings"]["dtype"] == "float32"
    # the self-check ran on the held-out tool-use items at the target layer
    assert result["cosine"]["harmful"]["items"] == 3 and set(result["cosine"]["harmful"]["per_layer"]) == {"1"}
    assert set(result["breaker"]["layers"]) == {"1"}
    summary = result["eval"]
    assert set(summary["asr"]) == {"direct", "forced_call"} and summary["judge"] == "tool_call"
    for cells in summary["asr"].values():
        assert cells["before"]["n"] == cells["after"]["n"] == 3
    tools = summary["tool_calls"]
    assert tools["n"] == 3
    for when in ("before", "after"):
        assert set(tools[when]) == {"exact", "right_tool", "any_call"}
        assert 0 <= tools[when]["any_call"]["correct"] <= 3
    assert json.loads((out / "demo.json").read_text()) == result
    report = agent_demo.agent_report(result)
    assert "forced_call" in report and "right tool" in report and "n=3" in report


@pytest.mark.slow
def test_agent_demo_rerun_reuses_the_subject_and_the_circuit_broken_model(agent_run, capsys):
    base, out, _ = agent_run
    files = {p: p.stat().st_mtime_ns for p in (out / "subject" / "model.safetensors", out / "model" / "model.safetensors")}
    result = agent_demo.run_agent_demo(out, RR, base=str(base), teach=TEACH, eval_budget=BUDGET, progress=False)
    assert result["teach_seconds"] is None and result["train_seconds"] is None
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert "reusing" in capsys.readouterr().out


def test_agent_config_points_the_recipe_at_the_subject(tmp_path):
    config = agent_demo.agent_config(tmp_path, ["steps=7"])
    assert config.model == str(tmp_path / "subject") and config.steps == 7
    assert "builtin:tools_harmful" in config.circuit_breaker_data and "builtin:tools_benign" in config.retain_data


@pytest.mark.parametrize("argv, message", [
    (["demo", "--agent", "model=foo"], "takes no model="),
    (["demo", "--agent", "--config", "smollm2-135m"], "takes no --config"),
    (["demo", "--agent", "--no-eval"], "takes no --no-eval"),
    (["demo", "--agent", "steps=0"], "steps"),
])
def test_demo_agent_rejects_what_it_cannot_honour_before_loading_anything(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_agent_runs_the_agent_demo_with_its_defaults(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(agent_demo, "run_agent_demo", lambda out, overrides, **kw: calls.append((out, overrides, kw)))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--agent", "--retrain", "steps=7"]) == 0
    assert calls == [(Path("runs/demo-agent"), ["steps=7"], {"retrain": True})]
