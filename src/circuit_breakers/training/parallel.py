"""How a run is spread over processes: the process group, and one strategy object per parallel mode.

The trainer's loop is the same in every mode; what differs sits behind one small interface
(`Parallel`): prepare the passes and the optimizer, run a pass, backward, optimizer step, the whole
LoRA state, the optimizer state in checkpoints, and whether per-process shortcuts (frozen-state
caches, per-batch activation-checkpointing plans) are allowed. The modes, chosen from the accelerate
config the launcher passes on:

- **single**: one process (no launcher, or `accelerate launch` with one process).
- **data parallel** (`multi-gpu`, torchrun). Every process holds the whole frozen model and the same
  LoRA weights; each optimizer step's global batch (`batch_size` items per set) is split into one
  shard per process, and after the backward passes of all micro-batches the LoRA gradients are
  averaged in one all-reduce, so every process clips and steps identically. This is what
  DistributedDataParallel does, without wrapping the model (the trainer runs the decoder through
  hooks and toggles the adapter off for its frozen pass; a wrapper would only be in the way), and
  with one collective per optimizer step, so gradient accumulation never syncs per micro-batch.
- **FSDP2** (`fsdp`). As above, plus each decoder block (and the decoder) is sharded with
  `fully_shard`: every process keeps 1/N of the frozen and LoRA weights and gathers a block's
  weights for its forward. Gradients are reduce-scattered by FSDP in each backward. Every process
  still loads the whole model once before sharding it.
- **DeepSpeed** (`deepspeed-zero2`, `deepspeed-zero3`, or any accelerate config with a DeepSpeed
  section): DeepSpeed's engine runs the passes and the optimizer step, ZeRO stage as configured
  (zero.py).

Accelerate is imported only when a launcher started several processes (or asked for FSDP or
DeepSpeed); DeepSpeed only by zero.py, for a DeepSpeed config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import ConfigError, RRConfig
from .lora import check_adapter, trainable_parameters

OPTIMIZER_FILE = "optimizer.pt"  # in a checkpoint: AdamW's state (not under DeepSpeed: its engine's files)

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
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        """End the process group once every process is done: a gloo thread still alive when the interpreter
        exits aborts the process ("terminate called without an active exception")."""
        if self.active and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

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


# ---------------------------------------------------------------- the strategies


def load_tensors(path: Path) -> dict:
    """A `torch.save` file of tensors and plain containers (an optimizer state), never a pickle of other objects."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{path}: holds objects other than tensors and plain values, which are not loaded "
                          f"(loading a pickle can run code): {str(err).splitlines()[0]}") from None


class Parallel:
    """One process: the interface every mode implements, and what the single-process run does.

    `prepare` runs once, after LoRA is added; then each optimizer step is `forward` passes, a
    `backward` per loss (`last` on the step's final one) and one `step`. Checkpoints use
    `full_lora_state`, `save_optimizer` and `load`; a mode's class attributes tell the trainer which
    per-process shortcuts it allows."""

    name = "single"  # as checkpoints record it: single, ddp, fsdp or deepspeed-zeroN
    caches_allowed = True  # frozen-state caches (they skip passes: not where every pass is a collective)
    per_batch_checkpoint_plans = True  # activation-checkpointing plans may differ between processes
    resume_family = "plain"  # checkpoints resume across modes of the same family only

    def __init__(self, dist: Distributed) -> None:
        self.dist = dist
        self.passes: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.trainable: list[nn.Parameter] = []

    def prepare(self, passes: nn.Module, config: RRConfig) -> None:
        """Give every process rank 0's LoRA weights, then make the optimizer over them."""
        self.passes, self.max_grad_norm = passes, config.max_grad_norm
        self.dist.broadcast_(trainable_parameters(passes.model))
        self._make_optimizer(passes.model, config)

    def _make_optimizer(self, model: nn.Module, config: RRConfig) -> None:
        self.trainable = trainable_parameters(model)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)

    def forward(self, *args, **kwargs):
        return self.passes(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Clip and step; returns the gradient norm before clipping (None where it was not computed)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def full_lora_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole LoRA weights on the CPU where no process holds them (a collective: every process
        calls it); None where the model's own are whole (PEFT reads them)."""
        return None

    def plain_loading(self):
        """A context in which a model loads whole on one process (to save the merged model)."""
        from contextlib import nullcontext
        return nullcontext()

    def save_optimizer(self, staging: Path) -> Callable[[Path], None]:
        """Called by every process at a checkpoint (a collective in sharded modes). Returns what rank 0
        runs to put the optimizer state into the checkpoint directory being written. `staging`: a
        place beside it for state every process writes (DeepSpeed)."""
        state = self._optimizer_state()
        return lambda directory: torch.save(state, directory / OPTIMIZER_FILE)

    def _optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load(self, checkpoint: Path, model: nn.Module, adapter_file: Path) -> None:
        """Restore the LoRA weights and the optimizer state (rank 0 reads, every process gets them)."""
        def read():
            from safetensors.torch import load_file
            return load_file(adapter_file), load_tensors(checkpoint / OPTIMIZER_FILE)
        adapter, optimizer = self.dist.on_main(read)
        names = check_adapter(model, adapter, checkpoint)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, name in names.items():
                params[name].copy_(self._local_part(params[name], adapter[key]))
        self._load_optimizer_state(model, optimizer)

    def _local_part(self, param: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        return value

    def _load_optimizer_state(self, model: nn.Module, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def check_resume(self, written_by: str, world: int, checkpoint: Path) -> None:
        """A ConfigError unless this mode can continue a checkpoint written by `written_by` on `world` processes."""
        family = "fsdp" if written_by == "fsdp" else "deepspeed" if written_by.startswith("deepspeed") else "plain"
        # The optimizer state's layout differs under FSDP, and DeepSpeed partitions it per process.
        if family != self.resume_family:
            raise ConfigError(f"{checkpoint} was written by a {written_by} run; resume it the same way "
                              f"(this run is {self.name})")


class DataParallel(Parallel):
    """Whole model on every process; LoRA gradients averaged once per optimizer step."""

    name = "ddp"

    def step(self) -> float | None:
        for p in self.trainable:  # a weight no item reached still takes part in the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.dist.average_([p.grad for p in self.trainable])
        return super().step()


class FullyShardedDataParallel(Parallel):
    """FSDP2: each decoder block, then the decoder, sharded over all processes."""

    name = "fsdp"
    resume_family = "fsdp"
    # Every forward is an all-gather: all processes must run the same passes (a cache hit on one would
    # deadlock the others), and a checkpointed block gathers its weights again in backward.
    caches_allowed = False
    per_batch_checkpoint_plans = False

    def prepare(self, passes: nn.Module, config: RRConfig) -> None:
        from torch.distributed.fsdp import fully_shard

        self.passes, self.max_grad_norm = passes, config.max_grad_norm
        self.dist.broadcast_(trainable_parameters(passes.model))
        for block in passes.arch.blocks:
            fully_shard(block)
        fully_shard(passes.arch.decoder)
        self._make_optimizer(passes.model, config)  # the parameters are DTensors now

    def full_lora_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for name, p in model.named_parameters() if p.requires_grad}

    def _optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.passes.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _local_part(self, param: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        """This process's shard of a whole LoRA weight."""
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)

    def _load_optimizer_state(self, model: nn.Module, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


def make_parallel(dist: Distributed) -> Parallel:
    """The strategy for the process group's mode."""
    if dist.mode == "deepspeed":
        from .zero import DeepSpeedParallel
        return DeepSpeedParallel(dist)
    return {"single": Parallel, "ddp": DataParallel, "fsdp": FullyShardedDataParallel}[dist.mode](dist)
