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
