"""length_sorted_batches: every index once, shortest first, ties in their order, batches of the given size."""
from circuit_breakers.batching import length_sorted_batches


def test_batches_of_similar_length_cover_every_item_once():
    lengths = [30, 7, 19, 7, 26, 11, 4]
    batches = length_sorted_batches(lengths, 3)
    assert batches == [[6, 1, 3], [5, 2, 4], [0]]  # 4, 7, 7 (ties in order) | 11, 19, 26 | 30
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_no_items_no_batches():
    assert length_sorted_batches([], 8) == []
