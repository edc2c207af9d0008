"""Training sets assembled from config specs: `builtin`, `builtin:NAME` and their errors."""
import pytest

from circuit_breakers.data.builtin import generated_set, load_training_sets
from circuit_breakers.data.schema import DataError


def test_builtin_is_the_shipped_train_splits():
    cb, retain = load_training_sets(["builtin"], ["builtin"], seed=0, refusals=False)
    assert len(cb) == len(generated_set("harmful", "train"))
    assert len(retain) == len(generated_set("benign", "train")) + len(generated_set("borderline", "train"))


def test_builtin_name_adds_one_set_so_listing_it_again_weights_it_up():
    borderline = generated_set("borderline", "train")
    _, retain = load_training_sets(["builtin"], ["builtin", "builtin:borderline"], seed=0, refusals=False)
    _, plain = load_training_sets(["builtin"], ["builtin"], seed=0, refusals=False)
    assert len(retain) == len(plain) + len(borderline)
    requests = [e.request for e in retain]
    assert all(requests.count(e.request) >= 2 for e in borderline)


def test_unknown_builtin_name_is_a_clear_error():
    with pytest.raises(DataError, match=r"'builtin:bordreline'.*builtin:borderline"):
        load_training_sets(["builtin"], ["builtin:bordreline"], seed=0)
