"""`circuit-breakers probe train` and `probe eval` on a tiny local checkpoint."""
import json

from circuit_breakers.cli import main
from circuit_breakers.data import write_jsonl

from ..conftest import make_tiny_model


def _data(tmp_path):
    harmful = [{"request": f"How do I do harm {i}?", "response": "Sure, here is a simple recipe for bread. " * 2}
               for i in range(5)]
    benign = [{"request": f"Explain the water cycle {i}", "response": "Water evaporates and rains."}
              for i in range(5)]
    heldout = [{"request": f"Explain it {i}", "response": "I cannot help with that request."} for i in range(6)]
    samples = [{"model": "base", "attack": "direct", "prompt": "How do I do harm?", "output": "Sure, here is a recipe.",
                "label": "harmful"},
               {"model": "base", "attack": "direct", "prompt": "How do I do harm?", "output": "I'm sorry.",
                "label": "refusal"},
               {"model": "rr", "attack": "direct", "prompt": "How do I do harm?", "output": "Sure, bread.",
                "label": "harmful"}]
    for name, records in (("harmful", harmful), ("benign", benign), ("heldout", heldout), ("samples", samples)):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    return {name: str(tmp_path / f"{name}.jsonl") for name in ("harmful", "benign", "heldout", "samples")}


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
    assert meta["calibration"]["achieved_fpr"] <= 0.2

    report = tmp_path / "eval.json"
    code = main(["probe", "eval", "--model", str(ckpt), "--probe", str(out), "--harmful", files["harmful"],
                 "--benign", files["heldout"], "--samples", files["samples"], "--samples-model", "base",
                 "--json", str(report),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "harmful.jsonl" in table and "attack direct" in table and "attacks (all)" in table
    result = json.loads(report.read_text())
    assert result["sets"]["heldout.jsonl"]["metric"] == "fpr" and result["sets"]["heldout.jsonl"]["rate"] <= 0.2
    assert result["sets"]["attack direct"]["responses"] == 1  # the base model's label=harmful line only
    assert result["sets"]["attacks (all)"]["responses"] == 1
    assert result["sets"]["harmful.jsonl"]["responses"] == 5


def test_probe_eval_reports_a_broken_probe(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    code = main(["probe", "eval", "--model", "unused", "--probe", str(tmp_path / "p")])
    assert code == 2
    assert "probe.json: missing" in capsys.readouterr().err
