"""Several processes, one run: what the trainer needs from `accelerate launch` (or `torchrun`).

Data parallelism for a LoRA-sized trainable set. Every process holds the whole (frozen) model and
the same LoRA weights; each optimizer step's global batch (`batch_size` items per set) is split into
one shard per process, and after the backward passes of all micro-batches the LoRA gradients are
averaged across processes in one all-reduce, so every process clips and steps identically. This
is what DistributedDataParallel does, without wrapping the model: the trainer runs the decoder
through hooks and toggles the adapter off for its frozen pass, and a wrapper would only be in the
way. Only one collective per optimizer step, so gradient accumulation never syncs per micro-batch.

A single process (no launcher, or `accelerate launch` with one process) takes none of these paths
and trains exactly as before. Accelerate is imported only when a launcher started several
processes (or asked for FSDP or DeepSpeed); DeepSpeed itself is never imported here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from .config import ConfigError

SHARDED_ENGINES = ("FSDP", "DEEPSPEED")


def _launched() -> bool:
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1
            or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")


class Distributed:
    """The process group as the trainer sees it; every method is a no-op for a single process."""

    def __init__(self, accelerator=None) -> None:
        self.accelerator = accelerator
        if accelerator is None:
            self.rank, self.world, self.engine = 0, 1, "none"
        else:
            self.rank = accelerator.process_index
            self.world = accelerator.num_processes
            self.engine = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()

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
    from accelerate import Accelerator  # sets up the process group (NCCL on GPUs, gloo on CPUs) and the device

    dist = Distributed(Accelerator())
    if dist.engine in SHARDED_ENGINES:
        raise ConfigError(
            f"accelerate config asks for {dist.engine}: the RR trainer runs data parallel (DDP-style, every "
            "process holds the frozen model and averages the LoRA gradients); sharded engines are not "
            "supported yet. Use --accelerate-config multi-gpu (see README, Multi-GPU and multi-node)")
    return dist
