"""`circuit-breakers probe train` and `probe eval` on a tiny local checkpoint."""
import json

from circuit_breakers.cli import main
from circuit_breakers.data import write_jsonl

from ..helpers import make_tiny_model


def _data(tmp_path):
    harmful = [{"request": f"How do I do harm {i}?", "response": "Sure, here is a simple recipe for bread. " * 2}
               for i in range(5)]
    benign = [{"request": f"Explain the water cycle {i}", "response": "Water evaporates and rains."}
              for i in range(5)]
    heldout = [{"request": f"Explain it {i}", "response": "I cannot help with that request."} for i in range(6)]
    harmful_test = [{"request": f"How do I do other harm {i}?", "response": "Sure, here is a recipe."}
                    for i in range(4)]
    benign_test = [{"request": f"Explain bread {i}", "response": "Bread is baked."} for i in range(5)]
    samples = [{"model": "base", "attack": "direct", "prompt": "How do I do harm?", "output": "Sure, here is a recipe.",
                "label": "harmful"},
               {"model": "base", "attack": "direct", "prompt": "How do I do harm?", "output": "I'm sorry.",
                "label": "refusal"},
               {"model": "rr", "attack": "direct", "prompt": "How do I do harm?", "output": "Sure, bread.",
                "label": "harmful"}]
    sets = {"harmful": harmful, "benign": benign, "heldout": heldout, "samples": samples,
            "harmful_test": harmful_test, "benign_test": benign_test}
    for name, records in sets.items():
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    return {name: str(tmp_path / f"{name}.jsonl") for name in sets}


def test_probe_train_then_eval(tmp_path, chat_tokenizer, capsys):
    ckpt = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4).save_pretrained(ckpt)
    chat_tokenizer.save_pretrained(ckpt)
    files = _data(tmp_path)
    out = tmp_path / "probe"
    code = main(["probe", "train", "--model", str(ckpt), "--layer", "2", "--kind", "mlp", "--fpr", "0.2",
                 "--out", str(out), "--positive", files["harmful"], "--negative", files["benign"],
                 "--heldout", files["heldout"], "--epochs", "3", "--max-tokens-per-item", "6", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "saved" in capsys.readouterr().out
    meta = json.loads((out / "probe.json").read_text())
    assert meta["kind"] == "mlp" and meta["layer"] == 2 and meta["target_fpr"] == 0.2
    assert meta["base_model"] == str(ckpt)
    sets = meta["training_data"]["sets"]
    assert sets["harmful.jsonl"] == {"label": 1, "items": 5, "tokens": 30}
    assert sets["benign.jsonl"]["label"] == 0 and sets["heldout.jsonl"]["items"] == 6
    calibration = meta["calibration"]
    assert calibration["achieved_fpr"] <= 0.2 and calibration["tripped"] == 1  # floor(0.2 * 6) of 6
    assert calibration["source"] == "heldout" and calibration["sets"]["heldout.jsonl"]["items"] == 6
    assert len(meta["item_ids"]["calibration"]) == 6 and len(meta["item_ids"]["training"]) == 10
    assert not set(meta["item_ids"]["calibration"]) & set(meta["item_ids"]["training"])

    report = tmp_path / "eval.json"
    evaluate = ["probe", "eval", "--model", str(ckpt), "--probe", str(out), "--no-progress"]
    code = main(evaluate + ["--harmful", files["harmful_test"], "--benign", files["benign_test"],
                            "--samples", files["samples"], "--samples-model", "base", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "harmful_test.jsonl" in table and "attack direct" in table and "attacks (all)" in table
    assert "threshold calibrated on 6 responses (heldout.jsonl 6): calibration FPR 1/6 = 0.167" in table
    result = json.loads(report.read_text())
    assert result["independence"] == "checked"
    assert result["sets"]["benign_test.jsonl"]["metric"] == "fpr"
    assert result["sets"]["benign_test.jsonl"]["responses"] == 5
    assert result["sets"]["attack direct"]["responses"] == 1  # the base model's label=harmful line only
    assert result["sets"]["attacks (all)"]["responses"] == 1
    assert result["sets"]["harmful_test.jsonl"]["responses"] == 4

    # FPR on the calibration responses, or TPR on the fitted ones, would be in-sample: refused ...
    code = main(evaluate + ["--harmful", files["harmful_test"], "--benign", files["heldout"]])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to report in-sample rates: heldout.jsonl: 6 of 6 responses calibrated" in err
    code = main(evaluate + ["--harmful", files["harmful"], "--benign", files["benign_test"]])
    assert code == 2 and "harmful.jsonl: 0 of 5 responses calibrated the threshold, 5 were fitted on" in \
        capsys.readouterr().err
    # ... unless asked for, and then marked
    code = main(evaluate + ["--harmful", files["harmful_test"], "--benign", files["heldout"], "--allow-overlap",
                            "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 0 and "WARNING: IN-SAMPLE: heldout.jsonl" in captured.err
    assert "IN-SAMPLE (6 calibration, 0 fitted items)" in captured.out
    assert json.loads(report.read_text())["sets"]["heldout.jsonl"]["overlap"]["calibration"] == 6


def test_probe_eval_reports_a_broken_probe(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    code = main(["probe", "eval", "--model", "unused", "--probe", str(tmp_path / "p")])
    assert code == 2
    assert "probe.json: missing" in capsys.readouterr().err
