"""DeepSpeed ZeRO (stages 0-3) as the RR trainer's engine, set up through accelerate.

`accelerate launch` with a DeepSpeed config (the shipped `deepspeed-zero2`/`deepspeed-zero3`, or the
user's own accelerate config) hands each process a DeepSpeed plugin; `accelerator.prepare` wraps the
trainer's forward passes and its AdamW in a `DeepSpeedEngine`. ZeRO-1/2 partition the optimizer
state and gradients of the LoRA weights; ZeRO-3 also partitions every weight, frozen or not, and
gathers each module's weights for its forward.

How the trainer drives the engine, and why:
- DeepSpeed sees one micro-batch of `batch_size / processes` items and no gradient accumulation per
  optimizer step. The trainer splits that batch into `grad_accum` micro-batches itself and calls
  `engine.backward` twice for each (rerouting, then retain: two graphs never live at once), then
  `engine.step()` once. Every backward but the last is marked as off the accumulation boundary, so
  ZeRO sums their gradients locally and reduces once, at the last.
- Every pass, the adapter-disabled one included, goes through `engine(...)`: ZeRO-3 counts micro-steps
  at each engine forward, and a backward after a pass it did not see would overwrite the gradients of
  the previous backward instead of adding to them.
- Under ZeRO-3 the decoder always runs to its last kept block: stopping a forward early from a hook
  would leave gathered weights behind. The frozen-state caches are off (each forward is a collective,
  and a cache hit on one process only would leave the others waiting).
- Clipping (`max_grad_norm`) is DeepSpeed's own `gradient_clipping`; the gradient norm logged is the
  engine's, before clipping, as without DeepSpeed.
- Checkpoints: `engine.save_checkpoint` (every process writes its partition of the optimizer state;
  frozen weights excluded), into the run's atomic checkpoint directory. A shared filesystem is needed
  across nodes, as for DeepSpeed itself. Resuming needs the same number of processes and ZeRO stage.

DeepSpeed is imported only here, and this module only when a DeepSpeed config launched the run.
`DeepSpeedParallel` is the trainer's strategy (parallel.py's interface); `ZeroEngine` drives the engine.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import ConfigError, RRConfig
from .lora import trainable_parameters
from .parallel import Distributed, Parallel

ENGINE_DIR = "deepspeed"  # inside a run checkpoint: the engine's own files
_TAG = "state"


class ZeroEngine:
    """The trainer's passes, its optimizer step and its checkpoints, run by DeepSpeed's engine."""

    def __init__(self, accelerator, passes: nn.Module, optimizer: torch.optim.Optimizer, config: RRConfig,
                 world: int) -> None:
        plugin = accelerator.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        accumulation = ds.get("gradient_accumulation_steps", "auto")
        if accumulation not in ("auto", 1, config.grad_accum):
            raise ConfigError(f"accelerate config: DeepSpeed gradient_accumulation_steps={accumulation}; the RR "
                              f"trainer accumulates its own micro-batches: set grad_accum={accumulation} in the RR "
                              "config instead (and leave DeepSpeed's at 1)")
        if "optimizer" in ds or "scheduler" in ds:
            raise ConfigError("accelerate config: the DeepSpeed config names an optimizer or scheduler; the RR "
                              "trainer brings its own AdamW (lr, weight_decay in the RR config): remove them")
        zero = ds.get("zero_optimization") or {}
        for key in ("offload_optimizer", "offload_param"):
            device = (zero.get(key) or {}).get("device", "none")
            if device not in ("none", None):
                raise ConfigError(f"DeepSpeed config: zero_optimization.{key}.device={device}: offloading is not "
                                  "supported by the RR trainer (LoRA's optimizer state is a few MB)")
        ds["train_micro_batch_size_per_gpu"] = config.batch_size // world
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = config.batch_size
        ds["gradient_clipping"] = config.max_grad_norm
        self.stage = int(zero.get("stage", 0))
        self.plugin = plugin
        self.engine, self.optimizer = accelerator.prepare(passes, optimizer)

    @property
    def sharded(self) -> bool:
        """ZeRO-3: every weight is partitioned, and every forward is a collective."""
        return self.stage >= 3

    def passes(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """`last`: the final backward before the optimizer step, where ZeRO reduces the gradients it has
        summed locally (DeepSpeed's documented way to accumulate with one `step()` per optimizer step)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float | None:
        """Clip, step and zero the gradients; returns the gradient norm before clipping (None where
        DeepSpeed did not compute one: ZeRO-1/2 without clipping)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @contextmanager
    def gathered(self, params: Sequence[nn.Parameter]) -> Iterator[None]:
        """Under ZeRO-3, the whole of `params` on every process while the body runs (a collective)."""
        if not self.sharded:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield

    @contextmanager
    def plain_models(self) -> Iterator[None]:
        """Inside, transformers and PEFT do not see the ZeRO-3 config accelerate registered with them, so a
        model loaded here (by one process, to save the merged model) stays whole and starts no collective."""
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.plugin.set_deepspeed_weakref()

    def save(self, directory: Path) -> None:
        """Every process writes its part of the engine's state (trainable weights, optimizer) under `directory`."""
        self.engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        if not (directory / _TAG).is_dir():
            raise ConfigError(f"{directory.parent}: no DeepSpeed engine state in it (written without DeepSpeed?)")
        path, _ = self.engine.load_checkpoint(str(directory), tag=_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"{directory}: DeepSpeed could not load its checkpoint")


class DeepSpeedParallel(Parallel):
    """The trainer's strategy under DeepSpeed: every pass, backward and step through `ZeroEngine`."""

    resume_family = "deepspeed"
    # Under ZeRO-3 a checkpointed block gathers its weights again in backward: plans that differ between
    # processes (each has its own batch lengths) would desynchronise them.
    per_batch_checkpoint_plans = False

    def __init__(self, dist: Distributed) -> None:
        super().__init__(dist)
        zero = dist.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") or {}
        self.stage = int(zero.get("stage", 0))
        self.engine: ZeroEngine | None = None

    @property
    def name(self) -> str:
        return f"deepspeed-zero{self.stage}"

    @property
    def caches_allowed(self) -> bool:
        return self.stage < 3  # ZeRO-3: every forward is a collective

    def prepare(self, passes: nn.Module, config: RRConfig) -> None:
        self.passes = passes
        self.dist.broadcast_(trainable_parameters(passes.model))
        self._make_optimizer(passes.model, config)
        self.engine = ZeroEngine(self.dist.accelerator, passes, self.optimizer, config, self.dist.world)
        if self.engine.sharded:
            passes.stop_early = False  # an exception mid-forward would leave ZeRO-3's gathered weights behind

    def forward(self, *args, **kwargs):
        return self.engine.passes(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.engine.backward(loss, last=last)

    def step(self) -> float | None:
        return self.engine.step()

    def full_lora_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        if not self.engine.sharded:
            return None
        with self.engine.gathered(self.trainable):
            return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}

    def plain_loading(self):
        return self.engine.plain_models()

    def save_optimizer(self, staging: Path) -> Callable[[Path], None]:
        # Every process writes its partition beside the checkpoint being made (a `.step-` name: a killed
        # run's leftovers are removed like other half-written checkpoints); rank 0 moves it in.
        self.engine.save(staging)
        self.dist.barrier()
        return lambda directory: os.replace(staging, directory / ENGINE_DIR)

    def load(self, checkpoint: Path, model: nn.Module, adapter_file: Path) -> None:
        self.engine.load(checkpoint / ENGINE_DIR)  # LoRA weights and this process's optimizer partition

    def check_resume(self, written_by: str, world: int, checkpoint: Path) -> None:
        super().check_resume(written_by, world, checkpoint)
        if (written_by, world) != (self.name, self.dist.world):
            raise ConfigError(f"{checkpoint} was written by {world} processes under {written_by}; DeepSpeed "
                              f"resumes only with the same number of processes and ZeRO stage "
                              f"(this run: {self.dist.world} under {self.name})")
