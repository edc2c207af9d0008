"""Gradient checkpointing chosen by memory (activation_checkpointing.py) and the trainer's use of it."""
import types

import pytest
import torch

from circuit_breakers.training.memory import CheckpointPlanner, supports_per_block_checkpointing
from circuit_breakers.models import find_architecture

from ..helpers import make_tiny_model, tiny_trainer


def _fake_arch(n: int):
    return types.SimpleNamespace(blocks=[types.SimpleNamespace(gradient_checkpointing=True) for _ in range(n)])


def test_planner_leaves_as_many_blocks_unchecked_as_the_budget_allows():
    arch = _fake_arch(10)
    full, checkpointed = 100, 10  # bytes per token per block
    planner = CheckpointPlanner(arch, budget_bytes=1000 * (10 * checkpointed + full) + 1000 * 3 * 90, full=full,
                                checkpointed=checkpointed)
    assert planner.plan(1000) == 3
    assert [b.gradient_checkpointing for b in arch.blocks] == [False] * 3 + [True] * 7
    # The estimate for the chosen plan stays inside the budget; one more block would not.
    kept = lambda k, p: p * (k * full + (10 - k) * checkpointed + full)  # noqa: E731
    assert kept(3, 1000) <= planner.budget < kept(4, 1000)
    assert planner.plan(100) == 10  # a short batch fits without any checkpointing
    assert planner.plan(10**6) == 0  # a huge one is checkpointed everywhere
    assert all(b.gradient_checkpointing for b in arch.blocks)


def _batches(trainer, steps: int = 3):
    n_cb, n_retain = len(trainer.cb_items), len(trainer.retain_items)
    return [([(2 * t) % n_cb, (2 * t + 1) % n_cb], [(2 * t) % n_retain, (2 * t + 3) % n_retain])
            for t in range(1, steps + 1)]


def _run(trainer, steps: int = 3) -> list[dict]:
    """Fixed batches, straight through RRTrainer.step (the loop around it is tested elsewhere)."""
    return [trainer.step(t, cb, retain) for t, (cb, retain) in enumerate(_batches(trainer, steps), start=1)]


def _lora_after(chat_tokenizer, **overrides):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4)
    trainer = tiny_trainer(model, chat_tokenizer, steps=3, target_layers=[2, 3], lora_dropout=0.0, **overrides)
    return trainer, model


def test_partial_checkpointing_gives_the_same_training(chat_tokenizer):
    trainer_off, _ = _lora_after(chat_tokenizer, gradient_checkpointing="false")
    log_off = _run(trainer_off)
    trainer, model = _lora_after(chat_tokenizer, gradient_checkpointing="true")
    arch = find_architecture(model)
    assert supports_per_block_checkpointing(arch)
    # A budget that fits two of the four blocks without checkpointing for these batches.
    # With 10 bytes per token un-checkpointed and 1 checkpointed, the largest grad pass fits two of the
    # four blocks without checkpointing; the last pass of every step (rerouting) is what the log shows.
    cb_positions = [2 * max(trainer.cb_items[i].length for i in cb) for cb, _ in _batches(trainer)]
    largest = max(cb_positions)
    trainer.checkpoint_planner = CheckpointPlanner(arch, largest * (4 * 1 + 10 + 2 * 9), 10, 1)
    log = _run(trainer)
    assert [r["blocks_without_checkpointing"] for r in log] == [
        min(4, (largest * 32 - p * 14) // (p * 9)) for p in cb_positions]
    assert 2 in [r["blocks_without_checkpointing"] for r in log]
    for a, b in zip(log_off, log):
        assert b["rerouting_loss"] == pytest.approx(a["rerouting_loss"], abs=1e-6)
        assert b["retain_loss"] == pytest.approx(a["retain_loss"], rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("frozen_cache_gb", [0.0, 2.0])
def test_joint_frozen_pass_gives_the_same_losses(chat_tokenizer, frozen_cache_gb):
    logs = {}
    for joint in (False, True):
        trainer, _ = _lora_after(chat_tokenizer, joint_frozen_pass=joint, frozen_cache_gb=frozen_cache_gb,
                                 gradient_checkpointing="false")
        # B != 0: at B = 0 the losses sit at a stationary point where the padded pass's rounding (1e-9)
        # is the whole gradient, and Adam would turn it into a full-size step.
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        logs[joint] = _run(trainer)
    for a, b in zip(logs[False], logs[True]):
        assert b["rerouting_loss"] == pytest.approx(a["rerouting_loss"], rel=1e-5, abs=1e-6)
        assert b["retain_loss"] == pytest.approx(a["retain_loss"], rel=1e-4, abs=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto checkpointing measures CUDA allocator statistics")
def test_auto_checkpointing_on_cuda_measures_and_plans(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4).cuda()
    trainer = tiny_trainer(model, chat_tokenizer, steps=3, target_layers=[2, 3], lora_dropout=0.0,
                       gradient_checkpointing="auto", dtype="float32")
    planner = trainer.checkpoint_planner
    assert planner is not None and planner.full > planner.checkpointed > 0
    log = _run(trainer)
    assert all(r["blocks_without_checkpointing"] == 4 for r in log)  # a tiny model fits in any GPU
    model_off = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4).cuda()
    trainer_off = tiny_trainer(model_off, chat_tokenizer, steps=3, target_layers=[2, 3], lora_dropout=0.0,
                       gradient_checkpointing="false")
    log_off = _run(trainer_off)
    for a, b in zip(log_off, log):
        assert b["retain_loss"] == pytest.approx(a["retain_loss"], rel=1e-3, abs=1e-7)
