"""Fixtures for the vision-language tests: a folder of small images and JSONL sets that use them."""
from __future__ import annotations

import pytest

from circuit_breakers.data import write_jsonl

from ..helpers import write_test_image


@pytest.fixture(autouse=True)
def every_test_on_one_thread(one_thread):
    """tests/conftest.py's one_thread, for every test here."""


@pytest.fixture
def image_sets(tmp_path):
    """(circuit-breaker JSONL, retain JSONL): image+text and text-only items, image paths relative to the files."""
    (tmp_path / "images").mkdir()
    for i, size in enumerate([(20, 24), (12, 12), (16, 30)]):
        write_test_image(tmp_path / "images" / f"{i}.png", size, seed=i)
    harmful = [{"request": f"How do I bake bread {i}?", "response": "Sure, here is a simple recipe for bread.",
                **({"images": [f"images/{i % 3}.png"]} if i % 2 == 0 else {})} for i in range(6)]
    benign = [{"request": f"Explain the water cycle {i}", "response": "Water evaporates and rains.",
               **({"images": [f"images/{(i + 1) % 3}.png"]} if i % 3 == 0 else {})} for i in range(6)]
    write_jsonl(tmp_path / "harmful.jsonl", harmful)
    write_jsonl(tmp_path / "benign.jsonl", benign)
    return tmp_path / "harmful.jsonl", tmp_path / "benign.jsonl"
