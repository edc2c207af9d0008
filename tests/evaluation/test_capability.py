"""Capability and over-refusal pieces, and the representation report, on tiny models."""
import math

import pytest

from circuit_breakers.data.schema import Example
from circuit_breakers.evaluation.capability import (answer_agreement, capability_report, heldout_perplexity,
                                                    lm_eval_command, token_f1)
from circuit_breakers.evaluation.diagnostics import representation_report

from ..helpers import make_tiny_model


def test_token_f1_and_agreement():
    assert token_f1("The cat sat.", "the cat sat") == 1.0
    assert token_f1("a b", "c d") == 0.0
    assert token_f1("a b c d", "a b") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    result = answer_agreement(["same text", "x y"], ["same  text", "x z"])
    assert result["exact_match"] == 0.5 and result["token_f1"] == pytest.approx((1 + 0.5) / 2) and result["n"] == 2


def test_heldout_perplexity_is_token_weighted(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    examples = [Example(response="Water evaporates.", request="Explain the water cycle."),
                Example(response="Sure, here is a simple recipe for bread.", request="How do I bake bread?")]
    result = heldout_perplexity(model, chat_tokenizer, examples)
    assert result["n"] == 2 and result["tokens"] > 4
    assert 1 < result["perplexity"] < 2 * len(chat_tokenizer)  # a random model: near the vocabulary size


def test_capability_report_structure(chat_tokenizer, tmp_path):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    report = capability_report(model, chat_tokenizer, model, limit=2, max_new_tokens=3, batch_size=2,
                                samples_out=tmp_path / "cap.jsonl")
    for name in ("model", "baseline"):
        for kind in ("benign", "borderline"):
            rates = report["over_refusal"][name][kind]
            assert rates["n"] == 2 and 0 <= rates["not_answered_rate"] <= 1
    assert report["agreement"]["exact_match"] == 1.0  # the same model: identical greedy answers
    assert "perplexity" in report and ("skipped" in report["perplexity"] or report["perplexity"]["model"]["n"] > 0)
    assert "skipped" in report["lm_eval"] and report["lm_eval"]["command"].startswith("lm_eval --model hf")
    assert len((tmp_path / "cap.jsonl").read_text().splitlines()) == 8


def test_representation_report_same_model_is_cosine_one(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    report = representation_report(model, model, chat_tokenizer, limit=2, max_length=128)
    for name in ("harmful", "benign"):
        per_layer = report[name]["per_layer"]
        assert sorted(per_layer, key=int) == ["0", "1", "2"]
        assert all(math.isclose(v["cosine"], 1.0, abs_tol=1e-4) for v in per_layer.values())
        assert report[name]["items"] == 2 and report[name]["tokens"] in ("response", "all")


def test_lm_eval_command():
    assert lm_eval_command("OUT/model", ["mmlu", "arc_challenge"]) == (
        "lm_eval --model hf --model_args pretrained=OUT/model --tasks mmlu,arc_challenge --batch_size auto")
