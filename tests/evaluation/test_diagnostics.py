"""Representation diagnostics and the breaker self-check on tiny models."""
import pytest

from circuit_breakers.evaluation.diagnostics import breaker_verdict, heldout_cosines

from ..helpers import make_tiny_model


def _cosines(harmful: dict, benign: float, borderline: float) -> dict:
    return {"harmful": {"per_layer": {l: {"cosine": c, "norm_ratio": 1.0} for l, c in harmful.items()},
                        "mean_cosine": sum(harmful.values()) / len(harmful), "items": 3},
            "benign": {"per_layer": {}, "mean_cosine": benign, "items": 3},
            "borderline": {"per_layer": {}, "mean_cosine": borderline, "items": 3}}


def test_verdict_formed_everywhere_and_kept():
    verdict = breaker_verdict(_cosines({15: -0.1, 20: 0.2}, 0.95, 0.9))
    assert verdict["ok"] and verdict["formed"] and verdict["benign_kept"] and verdict["borderline_kept"]
    assert verdict["layers"] == {"15": {"cosine": -0.1, "formed": True}, "20": {"cosine": 0.2, "formed": True}}
    assert verdict["problems"] == [] and verdict["advice"] == []


def test_verdict_names_the_layer_that_did_not_form():
    """The failure issue 11 reports: one layer rerouted, the other stayed at cosine ~1 (mean 0.4 hides it)."""
    verdict = breaker_verdict(_cosines({15: 0.984, 20: -0.19}, 0.95, 0.9))
    assert not verdict["ok"] and not verdict["formed"]
    assert verdict["layers"]["15"]["formed"] is False and verdict["layers"]["20"]["formed"] is True
    assert len(verdict["problems"]) == 1 and "layer 15" in verdict["problems"][0]
    assert any("steps" in a for a in verdict["advice"])


def test_verdict_reports_moved_benign_and_borderline_text():
    verdict = breaker_verdict(_cosines({15: 0.0}, 0.8, 0.6))
    assert verdict["formed"] and not verdict["ok"]
    assert verdict["benign_kept"] is False and verdict["borderline_kept"] is False
    assert any("benign" in p for p in verdict["problems"]) and any("borderline" in p for p in verdict["problems"])
    assert any("retain_weight" in a for a in verdict["advice"])


def test_heldout_cosines_of_a_model_with_itself_are_one(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=3)
    cosines = heldout_cosines(model, model, chat_tokenizer, [1, 3], max_length=128, limit=3)
    assert set(cosines) == {"harmful", "benign", "borderline"}
    for c in cosines.values():
        assert set(c["per_layer"]) == {1, 3} and c["items"] == 3
        assert c["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert breaker_verdict(cosines)["layers"]["1"]["formed"] is False


def test_similarity_does_not_depend_on_how_items_are_batched():
    # Items are batched by length (less padding); the per-token means must not depend on the batching.
    from circuit_breakers.data import TokenizedExample
    from circuit_breakers.evaluation.diagnostics import representation_similarity

    model, other = make_tiny_model("llama", layers=3, seed=0), make_tiny_model("llama", layers=3, seed=1)
    items = [TokenizedExample(tuple(range(5, 5 + n)), response_start=n // 2) for n in (30, 7, 19, 4, 26, 11)]
    one_batch = representation_similarity(model, other, items, 0, [1, 3], batch_size=len(items))
    by_twos = representation_similarity(model, other, items, 0, [1, 3], batch_size=2)
    for layer in (1, 3):
        assert one_batch[layer]["cosine"] < 0.99  # two different models: a non-trivial mean
        for key in ("cosine", "norm_ratio"):
            assert by_twos[layer][key] == pytest.approx(one_batch[layer][key], abs=1e-5)
