"""The parallel strategies' contract (training/parallel.py, zero.py) and the frozen-cache segments,
without launching processes (tests/training/test_parallel.py and test_zero.py launch them)."""
from pathlib import Path

import pytest
import torch

from circuit_breakers.config import ConfigError, RRConfig
from circuit_breakers.training.frozen_cache import CacheSegments, FrozenStateCache, plan_caches
from circuit_breakers.training.parallel import (DataParallel, Distributed, FullyShardedDataParallel, Parallel,
                                                 make_parallel)


def _dist(mode="single", world=1, stage=None):
    dist = Distributed(mode=mode)
    dist.world = world
    if stage is not None:
        plugin = type("Plugin", (), {"deepspeed_config": {"zero_optimization": {"stage": stage}}})()
        dist.accelerator = type("Accelerator", (), {"state": type("State", (), {"deepspeed_plugin": plugin})()})()
    return dist


def test_each_mode_gets_its_strategy_and_what_it_allows():
    single, ddp, fsdp = (make_parallel(_dist(m, w)) for m, w in (("single", 1), ("ddp", 2), ("fsdp", 2)))
    zero2, zero3 = (make_parallel(_dist("deepspeed", 2, stage)) for stage in (2, 3))
    assert [type(s) for s in (single, ddp, fsdp)] == [Parallel, DataParallel, FullyShardedDataParallel]
    assert [s.name for s in (single, ddp, fsdp, zero2, zero3)] == ["single", "ddp", "fsdp", "deepspeed-zero2",
                                                                      "deepspeed-zero3"]
    assert [s.caches_allowed for s in (single, ddp, fsdp, zero2, zero3)] == [True, True, False, True, False]
    assert [s.per_batch_checkpoint_plans for s in (single, ddp, fsdp, zero2)] == [True, True, False, False]


@pytest.mark.parametrize("written_by, world, mode, stage, error", [
    ("single", 1, "ddp", None, None),  # the same optimizer layout: a single run resumes under DDP and back
    ("ddp", 4, "single", None, None),
    ("fsdp", 2, "single", None, "written by a fsdp run; resume it the same way"),
    ("single", 1, "fsdp", None, "written by a single run; resume it the same way"),
    ("deepspeed-zero2", 2, "single", None, "written by a deepspeed-zero2 run"),
    ("deepspeed-zero2", 2, "deepspeed", 2, None),
    ("deepspeed-zero2", 4, "deepspeed", 2, "written by 4 processes under deepspeed-zero2"),
    ("deepspeed-zero2", 2, "deepspeed", 3, "same number of processes and ZeRO stage"),
])
def test_which_checkpoints_a_mode_resumes(written_by, world, mode, stage, error):
    strategy = make_parallel(_dist(mode, 2, stage))
    if error is None:
        strategy.check_resume(written_by, world, Path("ckpt"))
    else:
        with pytest.raises(ConfigError, match=error):
            strategy.check_resume(written_by, world, Path("ckpt"))


def test_single_process_step_clips_and_reports_the_norm_before_clipping():
    passes = torch.nn.Module()
    passes.model = torch.nn.Linear(3, 1, bias=False)
    strategy = Parallel(Distributed())
    strategy.prepare(passes, RRConfig(model="x", lr=0.1, weight_decay=0.0, max_grad_norm=1.0))
    passes.model.weight.grad = torch.full((1, 3), 4.0)
    before = passes.model.weight.detach().clone()
    assert strategy.step() == pytest.approx(48 ** 0.5)
    assert passes.model.weight.grad is None  # zeroed for the next step
    assert not torch.equal(before, passes.model.weight)


def test_caches_are_planned_first_come_first_served_within_the_budget():
    caches = plan_caches({"circuit_breaker": 2**29, "retain": 2**30}, budget_gb=1.0, allowed=True)
    assert isinstance(caches["circuit_breaker"], FrozenStateCache) and caches["retain"] is None
    assert all(c is None for c in plan_caches({"a": 1}, budget_gb=1.0, allowed=False).values())


def test_cache_segments_append_only_the_new_items_and_restore_them(tmp_path):
    cache = FrozenStateCache()
    cache.put([0, 1], {2: torch.arange(12.).view(2, 3, 2)}, lengths=[3, 2])
    writer = CacheSegments(tmp_path, rank=0)
    first = writer.append({"retain": cache}, step=2)
    cache.put([5], {2: torch.ones(1, 3, 2)}, lengths=[1])
    second = writer.append({"retain": cache}, step=4)
    assert first == {"retain": ["retain-step2.safetensors"]}
    assert second == {"retain": ["retain-step2.safetensors", "retain-step4.safetensors"]}

    restored = FrozenStateCache()
    CacheSegments(tmp_path, rank=0).restore({"retain": restored}, second, "cpu")
    assert sorted(restored.items) == [0, 1, 5]
    assert torch.equal(restored.items[1][2], cache.items[1][2]) and restored.items[1][2].shape == (2, 2)

    lost = FrozenStateCache()
    (tmp_path / "frozen-cache" / "rank0" / "retain-step4.safetensors").unlink()
    with pytest.warns(UserWarning, match="frozen-state cache not restored"):
        CacheSegments(tmp_path, rank=0).restore({"retain": lost}, second, "cpu")
    assert not lost.items  # recomputed, never half-restored
