"""Training, calibration and evaluation items are disjoint, by item and by a fixed seed."""
import random

import pytest

from circuit_breakers.data import Example
from circuit_breakers.data.builtin import generated_set
from circuit_breakers.probes.splits import CALIBRATION_FRACTION, calibration_split, item_key, item_keys, overlap
from circuit_breakers.probes.train import builtin_sets, carve_calibration


def _examples(n=40, categories=("a", "b", "c")):
    return [Example(request=f"q{i}", response=f"r{i}", category=categories[i % len(categories)]) for i in range(n)]


def test_item_key_is_by_content_not_by_object_or_source():
    a = Example(request="q", response="r", source="x.jsonl:1")
    assert item_key(a) == item_key(Example(request="q", response="r", source="y.jsonl:9"))
    assert item_key(a) == item_key(Example(messages=({"role": "user", "content": "q"},), response="r"))
    assert item_key(a) != item_key(Example(request="q", response="r2"))
    assert item_key(a) != item_key(Example(request="q2", response="r"))


def test_calibration_split_is_disjoint_stratified_and_fixed():
    examples = _examples()
    fit, cal = calibration_split(examples, 0.25)
    assert not item_keys(fit) & item_keys(cal) and len(fit) + len(cal) == len(examples)
    for category in "abc":  # round(n * fraction) of every category
        n = sum(e.category == category for e in examples)
        assert sum(e.category == category for e in cal) == round(n * 0.25)
    shuffled = list(examples)
    random.Random(5).shuffle(shuffled)
    assert item_keys(calibration_split(shuffled, 0.25)[1]) == item_keys(cal)  # file order does not matter
    assert item_keys(calibration_split(examples, 0.25, seed=1)[1]) != item_keys(cal)
    with pytest.raises(ValueError, match="fraction"):
        calibration_split(examples, 1.0)


def test_duplicates_of_one_item_land_on_one_side():
    examples = _examples(20, ("a",))
    examples = examples + examples[:10]  # items 0..9 twice
    fit, cal = calibration_split(examples, 0.3)
    assert not item_keys(fit) & item_keys(cal)
    assert len(item_keys(cal)) == 6


def test_builtin_default_keeps_training_calibration_and_test_items_disjoint():
    positive, negative, calibration = builtin_sets()
    assert set(calibration) == {"benign.train[calibration]", "borderline.train[calibration]"}
    assert set(negative) == {"benign.train[fit]", "borderline.train[fit]", "refusal.train"}
    trained = item_keys(e for sets in (positive, negative) for v in sets.values() for e in v)
    calibrated = item_keys(e for v in calibration.values() for e in v)
    tested = {name: generated_set(name, "test") for name in ("harmful", "benign", "borderline")}
    assert calibrated and not trained & calibrated
    assert overlap(tested, trained) == {} and overlap(tested, calibrated) == {}
    for name in ("benign", "borderline"):  # every train item is either fitted or calibrated on
        whole = generated_set(name, "train")
        assert len(negative[f"{name}.train[fit]"]) + len(calibration[f"{name}.train[calibration]"]) == len(whole)
        assert 0.15 < len(calibration[f"{name}.train[calibration]"]) / len(whole) < 0.25
    _, _, again = builtin_sets()
    assert item_keys(e for v in again.values() for e in v) == calibrated  # fixed, not random per run
    assert CALIBRATION_FRACTION == 0.2


def test_carve_calibration_only_splits_the_named_sets():
    fit, cal = carve_calibration({"x": _examples(10), "y": _examples(10, ("z",))}, 0.5, names=["x"])
    assert set(fit) == {"x[fit]", "y"} and set(cal) == {"x[calibration]"}
    assert len(fit["y"]) == 10
