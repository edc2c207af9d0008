"""Batches and model inputs (training/batches.py): the collator is how other inputs reach the model."""
import pytest
import torch

from circuit_breakers.data import TokenizedExample
from circuit_breakers.training.batches import TextCollator, batch_indices, make_batch, stack_batches

from ..helpers import make_tiny_model, tiny_trainer


def _examples(lengths):
    return [TokenizedExample(tuple(range(5, 5 + n)), n // 2) for n in lengths]


def test_a_batch_carries_model_inputs_apart_from_the_response_mask():
    batch = make_batch(TextCollator(pad_token_id=0), _examples([3, 5]), [1, 0], "cpu")
    assert set(batch.inputs) == {"input_ids", "attention_mask"}
    assert batch.indices == [1, 0] and batch.width == 5 and batch.lengths == [5, 3] and batch.tokens == 8
    assert batch.response_mask.tolist() == [[False, False, True, True, True], [False, True, True, False, False]]


def test_stacked_batches_are_right_padded_to_the_wider_one():
    collator = TextCollator(pad_token_id=0)
    a = make_batch(collator, _examples([2, 4]), [0, 1], "cpu")
    b = make_batch(collator, _examples([6]), [0], "cpu")
    stacked = stack_batches(a, b)
    assert stacked["input_ids"].shape == (3, 6)
    assert stacked["attention_mask"].sum(dim=1).tolist() == [2, 4, 6]
    assert torch.equal(stacked["input_ids"][2], b.inputs["input_ids"][0])


def test_every_item_is_drawn_once_per_epoch():
    batches = batch_indices([5, 1, 4, 2, 3, 6], 2, seed=0)
    epoch = [i for _ in range(3) for i in next(batches)]
    assert sorted(epoch) == list(range(6))


class PositionIdsCollator(TextCollator):
    """A collator with one more model input (what an image or tool-use collator does), recorded as it is used."""

    stackable = False

    def __init__(self, pad_token_id):
        super().__init__(pad_token_id)
        self.calls = 0

    def __call__(self, items):
        tensors = super().__call__(items)
        tensors["position_ids"] = (tensors["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        self.calls += 1
        return tensors


@pytest.mark.parametrize("joint_frozen_pass", [False, True])
def test_a_collators_extra_inputs_reach_the_decoder_in_both_passes(chat_tokenizer, joint_frozen_pass):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4)
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append("position_ids" in kwargs),
                                          with_kwargs=True)
    trainer = tiny_trainer(model, chat_tokenizer, steps=2, target_layers=[2, 3], frozen_cache_gb=0.0,
                       joint_frozen_pass=joint_frozen_pass)
    trainer.collator = collator = PositionIdsCollator(chat_tokenizer.pad_token_id)
    log = trainer.train().log
    assert collator.calls == 4  # one circuit-breaker and one retain batch per step
    # Frozen and grad pass of each set, every step (a non-stackable collator gets no joint pass).
    assert len(seen) == 8 and all(seen)
    assert all(torch.isfinite(torch.tensor(r["retain_loss"])) for r in log)


def test_explicit_position_ids_give_the_losses_of_implicit_ones(chat_tokenizer):
    """The extra input is really used: the losses equal the default collator's, whose positions are implicit."""
    logs = []
    for collator in (None, PositionIdsCollator(chat_tokenizer.pad_token_id)):
        model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4)
        trainer = tiny_trainer(model, chat_tokenizer, steps=2, target_layers=[2, 3], lora_dropout=0.0)
        if collator is not None:
            trainer.collator = collator
        logs.append(trainer.train().log)
    for a, b in zip(*logs):
        assert b["retain_loss"] == pytest.approx(a["retain_loss"], rel=1e-5, abs=1e-9)
        assert b["rerouting_loss"] == pytest.approx(a["rerouting_loss"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_batch_indices_draw_every_item_once_per_epoch(group_by_length):
    rng = torch.Generator().manual_seed(0)
    small = torch.randint(10, 50, (6,), generator=rng).tolist()
    large = torch.randint(10, 50, (120,), generator=rng).tolist()
    small_batches = batch_indices(small, 3, seed=1, group_by_length=group_by_length)
    large_batches = batch_indices(large, 3, seed=2, group_by_length=group_by_length)
    # Drawn side by side, as the trainer does: 80 steps cover the large set twice, the small one 40 times.
    steps = [(next(small_batches), next(large_batches)) for _ in range(80)]
    assert all(len(s) == 3 and len(l) == 3 for s, l in steps)
    small_stream = [i for s, _ in steps for i in s]
    large_stream = [i for _, l in steps for i in l]
    for epoch in range(len(small_stream) // 6):
        assert sorted(small_stream[epoch * 6:(epoch + 1) * 6]) == list(range(6))
    for epoch in range(2):
        assert sorted(large_stream[epoch * 120:(epoch + 1) * 120]) == list(range(120))
    assert large_stream[:120] != large_stream[120:]  # a new shuffle each epoch


def test_batch_indices_deterministic_for_a_seed():
    lengths = list(range(40, 0, -1))

    def take(seed, n=30):
        batches = batch_indices(lengths, 4, seed)
        return [next(batches) for _ in range(n)]

    assert take(42) == take(42)
    assert take(42) != take(43)


def test_batch_indices_group_by_length():
    lengths = [(i * 37) % 100 for i in range(40)]  # 40 distinct lengths
    batches = batch_indices(lengths, 5, seed=3, group_by_length=True)
    first_epoch = [next(batches) for _ in range(8)]
    ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in first_epoch)
    for (lo1, hi1), (lo2, hi2) in zip(ranges, ranges[1:]):
        assert hi1 < lo2  # batches hold contiguous runs of the length order: minimal padding


def test_batch_indices_epochs_carry_over_when_batch_does_not_divide():
    lengths = [(i * 13) % 29 for i in range(23)]  # 23 items in batches of 4: a short batch every epoch
    batches = batch_indices(lengths, 4, seed=5)
    stream = [i for _ in range(23) for i in next(batches)]  # 92 items = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * 23:(epoch + 1) * 23]) == list(range(23))
