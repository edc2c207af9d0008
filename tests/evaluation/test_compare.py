"""`circuit-breakers compare`: the base model and two tiny defences under one eval config, one table (every rate
with n and a Wilson interval) and a Pareto plot; bad --defence values are one clear line."""
from __future__ import annotations

import json

import pytest

from circuit_breakers.cli import main
from circuit_breakers.config import ConfigError
from circuit_breakers.evaluation.comparison import (SAFETY_PROMPT, comparison_table, pareto_front, parse_defences,
                                                   results_front, table_rows, write_comparison)
from circuit_breakers.evaluation.harness import read_samples
from circuit_breakers.evaluation.pipeline import load_eval_config

from ..helpers import make_tiny_model

CONFIG = """
attacks:
  direct: {}
  finetune: {ns: [0, 2], steps: 1, train_batch_size: 2, max_length: 320}  # room for the safety prompt
behaviors: 2
max_new_tokens: 4
judge: heuristic
capability: true
capability_prompts: 3
diagnostics: false
"""


@pytest.fixture
def second_checkpoint(tmp_path, chat_tokenizer):
    path = tmp_path / "tiny2"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4, seed=1).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def test_compare_writes_one_table_with_intervals_and_a_pareto_plot(tmp_path, tiny_checkpoint, second_checkpoint,
                                                                   capsys):
    config = tmp_path / "budget.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "cmp"
    code = main(["compare", "--base", str(tiny_checkpoint), "--defence", f"same={tiny_checkpoint}",
                 "--defence", f"other={second_checkpoint}", "--eval-config", str(config), "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "comparison.json").read_text())
    assert list(results["rows"]) == ["original", "safety-prompt", "same", "other"]
    assert results["attacks"] == ["direct", "finetune-0", "finetune-2"]
    # the safety-prompt row: the base model with the paper's system prompt before every attack and capability prompt
    assert results["safety_prompt"] == SAFETY_PROMPT and results["rows"]["safety-prompt"]["agreement"] is None
    prompted = read_samples(out / "models" / "safety-prompt" / "samples.jsonl")
    assert prompted and all(r["model"] == "model" and r["budget"]["system_prompt"] == SAFETY_PROMPT for r in prompted)
    prompted_run = json.loads((out / "models" / "safety-prompt" / "results.json").read_text())
    assert prompted_run["capability"]["system_prompt"] == SAFETY_PROMPT
    for name, row in results["rows"].items():
        assert row["asr"]["finetune-2"]["n"] == 2 and row["over_refusal"]["n"] == 3
        assert row["asr"]["finetune-2"]["budget"]["ns"] == [2]
    assert results["rows"]["same"]["agreement"]["n"] == 3 and results["rows"]["original"]["agreement"] is None
    report = (out / "report.md").read_text()
    assert "| model | ASR direct | ASR finetune-0 | ASR finetune-2 |" in report
    line = next(l for l in report.splitlines() if l.startswith("| other |"))
    assert line.count("n=2") == 3 and line.count("n=3") >= 2 and "[" in line and "]" in line
    assert (out / "figures" / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert 'src="data:image/png;base64,' in (out / "report.html").read_text()
    # the original's attacks ran once: the second run resumed the first one's samples of it
    first = [r for r in read_samples(out / "models" / "same" / "samples.jsonl") if r["model"] == "baseline"]
    second = [r for r in read_samples(out / "models" / "other" / "samples.jsonl") if r["model"] == "baseline"]
    assert first and first == second
    for name in ("same", "other"):
        assert (out / "models" / name / "report.html").is_file()
    # finetune-0 is the direct request
    samples = read_samples(out / "models" / "other" / "samples.jsonl")
    by = {(r["model"], r["attack"], r["behavior_id"]): r["output"] for r in samples}
    assert all(by[(m, "finetune-0", b)] == out_ for (m, a, b), out_ in by.items() if a == "direct")


@pytest.mark.parametrize("spec, message", [
    ("noequals", "expected NAME=MODEL_DIR"),
    ("=x", "expected NAME=MODEL_DIR"),
    ("bad name=x", "a name of letters"),
    ("original={ckpt}", "base model's row"),
    ("safety-prompt={ckpt}", "base model's row"),
    ("rr={empty}", "a directory without a model"),
    ("rr={missing}/model.yaml", "neither a model directory nor a training recipe"),
    ("rr={text}", "neither a model directory nor a training recipe"),
])
def test_bad_defences_are_one_clear_line(tmp_path, tiny_checkpoint, capsys, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    spec = spec.format(ckpt=tiny_checkpoint, empty=tmp_path / "empty", missing=tmp_path / "nowhere",
                       text=tmp_path / "notes.txt")
    out = tmp_path / "cmp"
    code = main(["compare", "--base", str(tiny_checkpoint), "--defence", spec, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_defences_parse_models_train_outputs_and_recipes(tmp_path, tiny_checkpoint):
    train_out = tmp_path / "run"
    (train_out / "model").mkdir(parents=True)
    (train_out / "model" / "config.json").write_text("{}")
    parsed = parse_defences([f"a={tiny_checkpoint}", f"b={train_out}", "c=smollm2-135m-repbend"])
    assert parsed["a"] == ("model", str(tiny_checkpoint)) and parsed["b"] == ("model", str(train_out / "model"))
    assert parsed["c"][0] == "recipe" and parsed["c"][1].endswith("smollm2-135m-repbend.yaml")
    with pytest.raises(ConfigError, match="given twice"):
        parse_defences([f"a={tiny_checkpoint}", f"a={tiny_checkpoint}"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_defences([])


def test_pareto_front_and_shipped_compare_config():
    points = {"original": (0.0, 0.9), "rr": (0.2, 0.1), "worse": (0.3, 0.2), "strict": (0.9, 0.0)}
    assert pareto_front(points) == ["original", "rr", "strict"]
    config = load_eval_config("compare")
    names = [a.name for a in config.make_attacks()]
    assert names[:6] == ["direct", "prefilling", "templates", "gcg", "embedding_improved", "refusal_ablation"]
    assert names[6:] == ["finetune-0", "finetune-10", "finetune-50"]


def _run(asr: float, over: float, perplexity: float) -> dict:
    """The parts of a results.json comparison_table reads (one attack, over-refusal, perplexity), for a defence
    ("model") beside the original ("baseline": ASR 90%, nothing unanswered, perplexity 2)."""
    def side(asr, over, perplexity):
        return ({"direct": {"asr": asr, "ci95": [0.0, 0.5], "broken": round(10 * asr), "n": 10}},
                {"borderline": {"not_answered_rate": over, "not_answered_ci95": [0.0, 0.3], "n": 20}},
                {"perplexity": perplexity, "n": 20, "tokens": 500})
    (asr_m, over_m, ppl_m), (asr_b, over_b, ppl_b) = side(asr, over, perplexity), side(0.9, 0.0, 2.0)
    return {"asr": {"model": asr_m, "baseline": asr_b},
            "capability": {"over_refusal": {"model": over_m, "baseline": over_b},
                           "perplexity": {"model": ppl_m, "baseline": ppl_b}}}


def test_a_collapsed_defence_is_marked_degenerate_and_kept_off_the_pareto_front(tmp_path):
    """A defence at 40x the original's perplexity answers nothing: its 0% ASR is no defence, so the table says
    DEGENERATE and the front leaves it out (it would otherwise beat every real defence on ASR)."""
    runs = {"rr": _run(0.2, 0.1, 2.5), "collapsed": _run(0.0, 0.05, 80.0)}
    results = comparison_table(runs, base="base")
    assert results["rows"]["original"]["perplexity"]["perplexity"] == 2.0
    assert [n for n, r in results["rows"].items() if r["degenerate"]] == ["collapsed"]
    assert pareto_front({n: (r["over_refusal"]["rate"], r["mean_asr"]) for n, r in results["rows"].items()}) \
        == ["original", "collapsed"]  # what the front was before degenerate rows were left out
    assert results_front(results) == ["original", "rr"]
    _, rows = table_rows(results)
    assert [r[0] for r in rows if "DEGENERATE" in r[-1]] == ["collapsed"]
    md, _ = write_comparison(results, tmp_path)
    assert "Left off it as degenerate" in md.read_text() and "collapsed." in md.read_text()


def test_a_refusal_recipe_trains_inside_compare(tmp_path, tiny_checkpoint, capsys):
    """A defence given as a recipe of method refusal (the classic refusal-only fine-tuning baseline) is trained on
    the base model into OUT/train/NAME, then evaluated beside the original in the one table."""
    from circuit_breakers.config import RRConfig

    cb, retain = tmp_path / "cb.jsonl", tmp_path / "retain.jsonl"
    cb.write_text("".join(json.dumps({"request": f"How do I bake bread {i}?",
                                      "response": "Sure, here is a simple recipe for bread."}) + "\n" for i in range(4)))
    retain.write_text("".join(json.dumps({"request": f"Explain the water cycle {i}.",
                                          "response": "Water evaporates, condenses and falls."}) + "\n"
                              for i in range(4)))
    recipe = tmp_path / "refusal.yaml"
    recipe.write_text(f"method: refusal\ncircuit_breaker_data: [{json.dumps(str(cb))}]\n"
                      f"retain_data: [{json.dumps(str(retain))}]\nrefusal_retain: false\ntarget_layers: [2]\n"
                      "steps: 2\nbatch_size: 2\nlr: 1.0e-2\nmax_length: 96\nsave_every: 0\n")
    config = tmp_path / "budget.yaml"
    config.write_text("attacks:\n  direct: {}\nbehaviors: 2\nmax_new_tokens: 4\njudge: heuristic\n"
                      "capability: false\ndiagnostics: false\n")
    out = tmp_path / "cmp"
    code = main(["compare", "--base", str(tiny_checkpoint), "--defence", f"refusal={recipe}", "--eval-config",
                 str(config), "--out", str(out), "--no-progress", "--no-safety-prompt"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "comparison.json").read_text())
    assert list(results["rows"]) == ["original", "refusal"] and results["safety_prompt"] is None
    assert results["rows"]["refusal"]["source"] == f"recipe {recipe}"
    assert results["rows"]["refusal"]["asr"]["direct"]["n"] == 2
    train = out / "train" / "refusal"
    trained = RRConfig.load(train / "config.yaml")
    assert trained.method == "refusal" and trained.model == str(tiny_checkpoint)
    log = [json.loads(line) for line in (train / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["c_s"] == r["c_r"] == 1.0 for r in log)
    assert all(r["rerouting_loss"] > 0 and r["retain_loss"] > 0 for r in log)  # the two cross-entropies
    assert (train / "model" / "config.json").is_file() and (out / "models" / "refusal" / "report.html").is_file()


def test_a_rerun_reuses_finished_rows_and_evaluates_a_retrained_model_again(tmp_path, tiny_checkpoint,
                                                                           second_checkpoint, capsys, monkeypatch):
    from circuit_breakers import models

    loaded = []
    load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda path, **kw: loaded.append(str(path)) or load_model(path, **kw))
    config = tmp_path / "budget.yaml"
    config.write_text(CONFIG.replace("finetune: {ns: [0, 2], steps: 1, train_batch_size: 2, max_length: 320}",
                                     "prefilling: {}"))
    out = tmp_path / "cmp"
    argv = ["compare", "--base", str(tiny_checkpoint), "--defence", f"a={tiny_checkpoint}", "--defence",
            f"b={second_checkpoint}", "--eval-config", str(config), "--out", str(out), "--no-progress",
            "--no-safety-prompt"]
    assert main(argv) == 0
    written = {n: (out / "models" / n / "results.json").stat().st_mtime_ns for n in ("a", "b")}
    first = json.loads((out / "comparison.json").read_text())
    capsys.readouterr()
    loaded.clear()
    assert main(argv) == 0  # nothing changed: both rows are read back, not evaluated
    assert capsys.readouterr().out.count("reusing") == 2
    assert loaded == []  # not even the base model is loaded
    assert {n: (out / "models" / n / "results.json").stat().st_mtime_ns for n in ("a", "b")} == written
    assert json.loads((out / "comparison.json").read_text())["rows"] == first["rows"]
    # b saved again into the same directory (same bytes, a new mtime): b, and only b, is evaluated again
    model_file = next(second_checkpoint.glob("*.safetensors"))
    model_file.write_bytes(model_file.read_bytes())
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "a: reusing" in printed and "evaluating b" in printed
    assert sorted(loaded) == sorted([str(tiny_checkpoint), str(second_checkpoint)])  # the base, once; b
    assert (out / "models" / "a" / "results.json").stat().st_mtime_ns == written["a"]
    assert (out / "models" / "b" / "results.json").stat().st_mtime_ns != written["b"]
