"""train_probe calibrates on items it is not fitted on; evaluate_probe refuses in-sample sets."""
import json
import math

import pytest

from circuit_breakers.data import Example
from circuit_breakers.probes import ProbeError, ProbeOverlapWarning, load_probe
from circuit_breakers.probes.evaluate import evaluate_probe, response_logits
from circuit_breakers.probes.splits import item_key, item_keys
from circuit_breakers.probes.train import train_probe

from ..helpers import make_tiny_model

WORDS = ["bread", "water", "cycle", "recipe", "simple", "sorry", "request", "sentences", "explain", "help"]


def _set(prefix, n, categories=("a", "b")):
    return [Example(request=f"{prefix} {WORDS[i % 10]} {i}?",
                    response=" ".join(WORDS[(i * 7 + j) % 10] for j in range(3 + i % 5)),
                    category=categories[i % len(categories)]) for i in range(n)]


@pytest.fixture(scope="module")
def model_and_tokenizer(chat_tokenizer):
    return make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=3), chat_tokenizer


def test_default_calibration_is_held_out_from_fitting_and_hits_the_target_fpr(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    positive, negative = _set("Harm", 12), _set("Explain", 40)
    train_probe(model, tokenizer, 2, "linear", 0.25, tmp_path / "p", positive={"harm": positive},
               negative={"retain": negative}, calibration_fraction=0.5, epochs=2)
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    calibration = meta["calibration"]
    assert calibration["source"] == "train-holdout" and calibration["fraction"] == 0.5
    assert calibration["sets"] == {"retain[calibration]": {"items": 20, "tokens": calibration["tokens"]}}
    assert meta["training_data"]["sets"]["retain[fit]"]["items"] == 20
    ids = meta["item_ids"]
    assert len(ids["calibration"]) == 20 and len(ids["training"]) == 32
    assert not set(ids["calibration"]) & set(ids["training"])  # disjoint at the item level
    assert set(ids["training"]) == item_keys(positive) | (item_keys(negative) - set(ids["calibration"]))

    # The calibration responses, rescored from scratch: the threshold halts about the target share of them.
    held = [e for e in negative if item_key(e) in set(ids["calibration"])]
    loaded = load_probe(tmp_path / "p")
    halted = int((response_logits(model, tokenizer, loaded, held) > loaded.threshold_logit).sum())
    assert halted == calibration["tripped"] == math.floor(0.25 * 20)
    assert calibration["achieved_fpr"] == halted / 20 <= 0.25
    assert abs(calibration["achieved_fpr"] - 0.25) <= 1 / 20


def test_given_heldout_items_the_probe_is_fitted_on_are_dropped(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    negative = _set("Explain", 10)
    heldout = _set("Other", 6) + negative[:2]
    with pytest.warns(ProbeOverlapWarning, match="dropped"):
        probe = train_probe(model, tokenizer, 2, "linear", 0.2, None, positive=_set("Harm", 6),
                            negative=negative, heldout_benign=heldout, epochs=1)
    assert probe.info["calibration"]["responses"] == 6 and probe.info["calibration"]["dropped_fitted_items"] == 2
    assert probe.info["calibration"]["source"] == "heldout"
    assert not set(probe.info["item_ids"]["calibration"]) & set(probe.info["item_ids"]["training"])


def test_evaluate_refuses_sets_the_probe_was_calibrated_or_fitted_on(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    positive, negative = _set("Harm", 10), _set("Explain", 20)
    train_probe(model, tokenizer, 2, "mlp", 0.1, tmp_path / "p", positive=positive, negative=negative,
                epochs=1)
    probe = load_probe(tmp_path / "p")
    calibrated = set(probe.info["item_ids"]["calibration"])
    calibration_items = [e for e in negative if item_key(e) in calibrated]
    unseen = {"harm.new": _set("Harm new", 4), "benign.new": _set("Explain new", 5)}
    options = dict(print_table=False)

    result = evaluate_probe(model, tokenizer, probe, harmful={"h": unseen["harm.new"]},
                            benign={"b": unseen["benign.new"]}, **options)
    assert result["independence"] == "checked" and "overlap" not in result["sets"]["b"]
    assert result["calibration"]["responses"] == len(calibration_items)

    with pytest.raises(ProbeError, match=r"refusing.*cal: 4 of 4 responses calibrated"):
        evaluate_probe(model, tokenizer, probe, harmful={"h": unseen["harm.new"]},
                       benign={"cal": calibration_items}, **options)
    with pytest.raises(ProbeError, match=r"fit: 0 of 10 responses calibrated the threshold, 10 were fitted on"):
        evaluate_probe(model, tokenizer, probe, harmful={"fit": positive}, benign=unseen, **options)
    with pytest.warns(ProbeOverlapWarning, match="IN-SAMPLE"):
        result = evaluate_probe(model, tokenizer, probe, harmful={"h": unseen["harm.new"]},
                                benign={"cal": calibration_items + unseen["benign.new"]}, allow_overlap=True,
                                **options)
    assert result["sets"]["cal"]["overlap"] == {"fitted": 0, "calibration": 4, "responses": 9}

    # A probe saved before item keys were recorded cannot be checked: it says so.
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    del meta["item_ids"]
    (tmp_path / "p" / "probe.json").write_text(json.dumps(meta))
    with pytest.warns(ProbeOverlapWarning, match="records no item keys"):
        result = evaluate_probe(model, tokenizer, load_probe(tmp_path / "p"), harmful={"h": positive},
                                benign={"cal": calibration_items}, **options)
    assert result["independence"] == "unchecked"
