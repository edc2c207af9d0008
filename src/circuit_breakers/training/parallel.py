"""Several processes, one run: what the trainer needs from `accelerate launch` (or `torchrun`).

Three ways to spread a run, chosen from the accelerate config the launcher passes on:

- **Data parallel** (`multi-gpu`, torchrun). Every process holds
  the whole frozen model and the same LoRA weights; each optimizer step's global batch
  (`batch_size` items per set) is split into one shard per process, and after the backward passes of
  all micro-batches the LoRA gradients are averaged in one all-reduce, so every process clips and
  steps identically. This is what DistributedDataParallel does, without wrapping the model (the
  trainer runs the decoder through hooks and toggles the adapter off for its frozen pass; a wrapper
  would only be in the way), and with one collective per optimizer step, so gradient accumulation
  never syncs per micro-batch.
- **Sharded** (`fsdp`). As above, plus each decoder block (and the
  decoder) is sharded with torch FSDP2 (`fully_shard`): every process keeps 1/N of the frozen and
  LoRA weights and gathers a block's weights for its forward. Gradients are reduce-scattered by
  FSDP in each backward. Every process still loads the whole model once before sharding it.
- **DeepSpeed** (`deepspeed-zero2`, `deepspeed-zero3`, or any accelerate config with a DeepSpeed
  section): DeepSpeed's engine runs the passes and the optimizer step, ZeRO stage as configured
  (deepspeed_engine.py).

A single process (no launcher, or `accelerate launch` with one process) takes none of these paths
and trains exactly as before. Accelerate is imported only when a launcher started several
processes (or asked for FSDP or DeepSpeed); DeepSpeed only by deepspeed_engine.py, for a DeepSpeed config.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from ..config import ConfigError

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() == "true"


def _launched() -> bool:
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 or _env_flag("ACCELERATE_USE_FSDP")
            or _env_flag("ACCELERATE_USE_DEEPSPEED"))


def parallel_mode(env: dict | None = None) -> tuple[str, str | None]:
    """("ddp", "fsdp" or "deepspeed", a note to print or None) for the accelerate config the launcher
    passed on in the environment. Offloading to the CPU or NVMe is refused: it is not tested with the
    RR trainer, and LoRA's optimizer state is a few MB."""
    env = os.environ if env is None else env
    flag = lambda name: env.get(name, "").lower() == "true"  # noqa: E731
    if flag("ACCELERATE_USE_FSDP"):
        if flag("FSDP_OFFLOAD_PARAMS"):
            raise ConfigError("accelerate config: fsdp_offload_params is not supported by the RR trainer")
        return "fsdp", None
    if flag("ACCELERATE_USE_DEEPSPEED"):
        for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
            if env.get(key, "none").lower() not in ("none", ""):
                raise ConfigError(f"accelerate config: DeepSpeed offloading ({key.split('_', 3)[-1].lower()}="
                                  f"{env[key]}) is not supported by the RR trainer")
        if flag("ACCELERATE_DEEPSPEED_ZERO3_INIT"):
            raise ConfigError("accelerate config: zero3_init_flag must be false (the trainer loads the model whole, "
                              "adds LoRA, then DeepSpeed partitions it)")
        return "deepspeed", None
    return "ddp", None


class Distributed:
    """The process group as the trainer sees it; every method is a no-op for a single process."""

    def __init__(self, accelerator=None, mode: str = "single") -> None:
        self.accelerator = accelerator
        self.mode = mode  # single, ddp, fsdp or deepspeed
        if accelerator is None:
            self.rank, self.world, self.engine = 0, 1, "none"
        else:
            self.rank = accelerator.process_index
            self.world = accelerator.num_processes
            if torch.distributed.is_initialized():  # accelerate counts 1 process for DeepSpeed on CPUs
                self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.engine = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over processes, in one all-reduce of a flat buffer."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_floats(self, values: Sequence[float], device: torch.device) -> list[float]:
        if not self.active:
            return list(values)
        buffer = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(buffer)
        return buffer.tolist()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every process rank 0's values (one broadcast of a flat buffer)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any], *, share: bool = True) -> Any:
        """Run `fn` on rank 0 only; its exception, and with `share` its result, reach every process
        (without `share` the others get None: for results too big to send, like a merged model)."""
        if not self.active:
            return fn()
        result = outcome = None
        if self.is_main:
            try:
                result = fn()
                outcome = ("ok", result if share else None)
            except BaseException as err:  # noqa: BLE001 - re-raised on every process below
                outcome = ("error", err)
        outcome = self.broadcast_object(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        return result if self.is_main else outcome[1]


def from_environment() -> Distributed:
    """The current process group: started by `accelerate launch` or `torchrun`, or a single process."""
    if not _launched():
        return Distributed()
    mode, note = parallel_mode()
    from accelerate import Accelerator  # sets up the process group (NCCL on GPUs, gloo on CPUs) and the device

    # No GPU (or `accelerate launch --cpu`): gloo over CPU processes, as under torchrun on a CPU machine.
    # (DeepSpeed picks its own accelerator, and its CPU one uses gloo: `cpu=True` would switch it off.)
    cpu = mode != "deepspeed" and (_env_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    dist = Distributed(Accelerator(cpu=cpu), mode)
    if not dist.active and mode == "ddp":
        dist.mode = "single"
    if note and dist.is_main:
        print(f"circuit-breakers: {note}", flush=True)
    return dist
