"""Checkpoints, resuming, and the checks that keep a run from being lost.

A checkpoint is a directory OUT/checkpoints/step-N holding everything needed to continue step N+1
exactly as an uninterrupted run would:

    adapter/              the LoRA weights (PEFT format: also usable on its own)
    optimizer.pt          AdamW's state (under DeepSpeed instead: deepspeed/, the engine's own files,
                          one optimizer partition per process)
    rng.pt                python, numpy, torch CPU and CUDA RNG states, one entry per process
    trainer_state.json    the step, how many batches each set's sampler has drawn, the config, a
                          fingerprint of the tokenised data (resuming on other data is an error) and
                          the frozen-state cache segments it needs (OUT/checkpoints/frozen-cache/)

It is written into a temporary sibling directory and renamed into place when complete; older
checkpoints are deleted only after that, keeping the newest `keep_checkpoints`. A run killed at any
moment therefore leaves at least the last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..config import ConfigError, RRConfig, atomic_write_text, read_yaml
from .zero import ENGINE_DIR
from ..models import unwrap

if TYPE_CHECKING:
    from .trainer import FrozenStateCache

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
ADAPTER_DIR = "adapter"
CACHE_DIR = "frozen-cache"
LOG_FILE = "train_log.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys that may differ between a checkpoint and the run resuming it: none of them changes the result.
RESUMABLE_OVERRIDES = ("device", "save_every", "keep_checkpoints", "frozen_cache_gb", "gradient_checkpointing",
                       "log_every", "checkpoint_frozen_cache")


class OutputDirError(ConfigError):
    """An output directory that cannot hold the run (not writable, too little free space)."""


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite; the message names the step and the last checkpoint."""


# ---------------------------------------------------------------- before training


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def check_writable(out: Path) -> None:
    """Create `out` and write a file in it, or raise OutputDirError naming it (os.access lies to root)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"output directory {out} is not writable ({err.strerror or err}); "
                             "choose another --out or fix its permissions") from None


def check_free_space(out: Path, *, checkpoint_bytes: int, checkpoints: int, other_bytes: dict[str, int]) -> None:
    """Fail before training when OUT's file system cannot hold the checkpoints and the final save."""
    need = checkpoint_bytes * checkpoints + sum(other_bytes.values())
    free = shutil.disk_usage(out).free
    if free < need:
        parts = [f"{checkpoints} checkpoint(s) of {human_size(checkpoint_bytes)} (adapter + optimizer state)"
                 if checkpoints else None] + [f"{k} {human_size(v)}" for k, v in other_bytes.items()]
        raise OutputDirError(f"output directory {out} has {human_size(free)} free, the run needs about "
                             f"{human_size(need)}: " + ", ".join(p for p in parts if p)
                             + "; free some space or choose another --out")


def state_bytes(tensors: Sequence[torch.Tensor]) -> int:
    # ds_numel: a ZeRO-3 parameter's whole size (its own tensor is this process's partition).
    return sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in tensors)


# ---------------------------------------------------------------- data fingerprint


def data_fingerprint(*sets) -> str:
    """A hash of the tokenised sets: a resumed run must see the same items in the same order."""
    digest = hashlib.sha256()
    for items in sets:
        digest.update(f"{len(items)}|".encode())
        for item in items:
            digest.update(array("q", (item.response_start, len(item.input_ids), *item.input_ids)).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            torch.cuda.set_rng_state(states[0])


# ---------------------------------------------------------------- finding checkpoints


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(run directory, checkpoint or None) for `--resume DIR`, DIR a run's OUT or one of its checkpoints."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent.parent, path
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / CHECKPOINTS).is_dir()):
        found = list_checkpoints(path)
        return path, (found[-1] if found else None)
    raise ConfigError(f"--resume {path}: neither a run directory (with config.yaml and checkpoints/) "
                      f"nor a checkpoint directory (with {STATE_FILE})")


def resume_config(run_dir: Path, checkpoint: Path | None, overrides: dict) -> RRConfig:
    """The config a resumed run continues with: the checkpoint's own, plus harmless overrides."""
    values = (json.loads((checkpoint / STATE_FILE).read_text())["config"] if checkpoint is not None
              else read_yaml(run_dir / "config.yaml"))
    refused = sorted(k for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and values.get(k) != v)
    if refused:
        raise ConfigError(f"--resume continues the run with its own config; {', '.join(refused)} cannot change "
                          f"(only {', '.join(RESUMABLE_OVERRIDES)} can)")
    return RRConfig.from_dict({**values, **overrides}, where=f"{run_dir}/config.yaml")


def check_resumable(state: dict, config: RRConfig, fingerprint: str, checkpoint: Path) -> None:
    saved = state["config"]
    current = config.to_dict()
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_OVERRIDES and saved.get(k) != current.get(k))
    if changed:
        raise ConfigError(f"cannot resume from {checkpoint}: the config differs in "
                          + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed))
    if state.get("data_fingerprint") != fingerprint:
        raise ConfigError(f"cannot resume from {checkpoint}: the tokenised training data differ from the "
                          "checkpoint's (other files, or another tokenizer or chat template)")


# ---------------------------------------------------------------- writing


def write_checkpoint(out: Path, step: int, write_contents, keep: int) -> Path:
    """Write OUT/checkpoints/step-N atomically (`write_contents(tmp_dir)`), then drop all but the newest `keep`."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}-"))
    try:
        write_contents(tmp)
        _fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_stale_temporaries(out: Path) -> None:
    """Half-written checkpoints of a killed run (never renamed into place)."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the frozen-state cache


def write_cache_segment(out: Path, rank: int, name: str, step: int, items: dict) -> str:
    """Save cache items {item: {entry: tensor}} added since the last checkpoint; returns the file's name.

    The adapter-disabled model's states never change, so the cache is saved in append-only segments
    shared by all checkpoints (OUT/checkpoints/frozen-cache/rankR/SET-stepN.safetensors): a resumed run
    must use the very values the uninterrupted one cached (recomputing them in other batches differs
    in the last bits, and Adam can amplify that). Each process writes its own, so no state crosses
    the network; a checkpoint lists the segments it needs."""
    from safetensors.torch import save_file

    folder = Path(out) / CHECKPOINTS / CACHE_DIR / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}-step{step}.safetensors"
    tensors = {f"{item}.{entry}": value.detach().to("cpu").contiguous()
               for item, states in items.items() for entry, value in states.items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target.name


def read_cache_segments(out: Path, rank: int, names: list[str], device) -> dict:
    from safetensors.torch import load_file

    items: dict[int, dict[int, torch.Tensor]] = {}
    for name in names:
        for key, value in load_file(Path(out) / CHECKPOINTS / CACHE_DIR / f"rank{rank}" / name).items():
            item, entry = (int(x) for x in key.split("."))
            items.setdefault(item, {})[entry] = value.to(device)
    return items


# ---------------------------------------------------------------- the train log


def read_log(path: Path, up_to_step: int) -> list[dict]:
    """The records of train_log.jsonl up to a step; a half-written last line (a kill mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= up_to_step:
            records.append(record)
    return records


# ---------------------------------------------------------------- the trainer's side


class CheckpointedTraining:
    """What RRTrainer (training.py) does with its output directory and checkpoints: check it before the
    first step, save every `save_every` steps, restore on `--resume`. Kept here, beside the file format,
    so the training loop reads on its own. Uses the trainer's model, optimizer, caches, config and dist."""

    def _prepare_output(self, out: Path, resume) -> Path | None:
        """Before the first step (rank 0): the directory is writable and roomy enough, the config and the
        log are in place; returns the checkpoint to resume from, if any."""
        config = self.config
        check_writable(out)
        checkpoint = None
        if resume is True:
            found = list_checkpoints(out)
            checkpoint = found[-1] if found else None
        elif resume:
            checkpoint = resolve_resume(resume)[1]
        done = json.loads((checkpoint / STATE_FILE).read_text())["step"] if checkpoint else 0
        adapter = state_bytes(self.trainable)
        per_checkpoint = 3 * adapter + 2**16  # LoRA weights + AdamW's two moments (+ RNG and state files)
        checkpoints = min(config.keep_checkpoints, (config.steps - done) // config.save_every) if config.save_every else 0
        model = state_bytes(list(unwrap(self.model).parameters()))
        if self.dropped is not None:
            model += state_bytes([p for block in self.dropped.blocks for p in block.parameters()])
        cache = self._cache_bytes() if checkpoints and config.checkpoint_frozen_cache else 0  # once, in segments
        check_free_space(out, checkpoint_bytes=per_checkpoint, checkpoints=checkpoints,
                              other_bytes={"final adapter": adapter, "merged model": model,
                                           **({"frozen-state cache": cache} if cache else {})})
        remove_stale_temporaries(out)
        config.save(out / "config.yaml")
        log_path = out / LOG_FILE
        if checkpoint is None:
            log_path.unlink(missing_ok=True)
        else:  # steps logged after the checkpoint are done again: drop them (and a half-written line)
            kept = read_log(log_path, done)
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        return checkpoint

    def _cache_bytes(self) -> int:
        """The frozen-state caches in use, when full."""
        return sum(size for cache, size in zip((self.cb_cache, self.retain_cache), self.frozen_cache_sizes)
                   if cache is not None)

    def _non_finite_message(self, step: int, values: dict, out: Path | None) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._last_checkpoint is not None:
            tail = (f"the last good checkpoint is {self._last_checkpoint}; lower lr (or raise max_grad_norm's "
                    f"strictness) and continue with `circuit-breakers train --resume {out}`")
        elif out is not None and self.config.save_every:
            tail = f"no checkpoint had been written yet (save_every={self.config.save_every})"
        else:
            tail = "no checkpoints are written (no output directory or save_every=0)"
        return f"step {step}: loss or gradient norm is not finite ({shown}); training stopped; {tail}"

    def _frozen_caches(self) -> dict[str, FrozenStateCache]:
        return {name: cache for name, cache in (("circuit_breaker", self.cb_cache), ("retain", self.retain_cache))
                if cache is not None}

    def _save_cache_segments(self, out: Path, step: int) -> dict[str, list[str]]:
        """This process's frozen-cache items added since the last checkpoint, appended as new segments;
        returns every segment this process's caches consist of."""
        segments = getattr(self, "_cache_segments", None)
        if segments is None:
            segments = self._cache_segments = {"files": {}, "saved": {}}
        for name, cache in self._frozen_caches().items() if self.config.checkpoint_frozen_cache else ():
            saved = segments["saved"].setdefault(name, set())
            new = {i: states for i, states in cache.items.items() if i not in saved}
            if new:
                file = write_cache_segment(out, self.dist.rank, name, step, new)
                segments["files"].setdefault(name, []).append(file)
                saved.update(new)
        return {name: list(files) for name, files in segments["files"].items()}

    def _save_checkpoint(self, out: Path, step: int, fingerprint: str) -> None:
        rng = self.dist.gather_objects(rng_state())
        try:
            outcome = (self._save_cache_segments(out, step), None)
        except OSError as err:
            outcome = (None, err)
        outcomes = self.dist.gather_objects(outcome)
        for _, err in outcomes:
            if err is not None:
                raise err
        state = {"step": step, "batches_drawn": {"circuit_breaker": step, "retain": step},
                 "world_size": self.dist.world, "parallel": self._parallel_name(), "config": self.config.to_dict(),
                 "data_fingerprint": fingerprint,
                 "frozen_cache": [segments for segments, _ in outcomes]}

        lora = self._full_lora_state()  # a collective when sharded
        engine_files = None
        if self.zero is not None:
            # Every process writes its partition of the optimizer state beside the checkpoint being made
            # (a `.step-` name: a killed run's leftovers are removed like other half-written checkpoints).
            engine_files = out / CHECKPOINTS / f".step-{step}-engine"
            self.zero.save(engine_files)
            self.dist.barrier()
            optimizer = None
        else:
            optimizer = self._optimizer_state()  # a collective under FSDP

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp / ADAPTER_DIR, state_dict=lora)
            if engine_files is not None:
                os.replace(engine_files, tmp / ENGINE_DIR)
            else:
                torch.save(optimizer, tmp / OPTIMIZER_FILE)
            torch.save({"world_size": self.dist.world, "states": rng}, tmp / RNG_FILE)
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1) + "\n")  # last: marks it complete
        self._last_checkpoint = self.dist.on_main(
            lambda: write_checkpoint(out, step, write, self.config.keep_checkpoints))

    def _load_checkpoint(self, checkpoint: Path, fingerprint: str) -> dict:
        """Restore LoRA weights, optimizer and RNG states; rank 0 reads, every process gets them."""
        def read():
            from safetensors.torch import load_file

            state = json.loads((checkpoint / STATE_FILE).read_text())
            check_resumable(state, self.config, fingerprint, checkpoint)
            adapter = load_file(checkpoint / ADAPTER_DIR / "adapter_model.safetensors")
            optimizer_file = checkpoint / OPTIMIZER_FILE  # absent under DeepSpeed: its engine's files instead
            optimizer = torch.load(optimizer_file, map_location="cpu") if optimizer_file.exists() else None
            # Our own file: python's and numpy's RNG states are plain tuples and arrays, not tensors.
            rng = torch.load(checkpoint / RNG_FILE, map_location="cpu", weights_only=False)
            return state, adapter, optimizer, rng
        state, adapter, optimizer, rng = self.dist.on_main(read)
        written_by, this_run = state.get("parallel", "single"), self._parallel_name()
        # The optimizer state's layout differs under FSDP, and DeepSpeed partitions it per process.
        if (written_by == "fsdp") != self.dist.sharded or written_by.startswith("deepspeed") != (self.zero is not None):
            raise ConfigError(f"{checkpoint} was written by a {written_by} run; resume it the same way "
                              f"(this run is {this_run})")
        if self.zero is not None and (written_by, state["world_size"]) != (this_run, self.dist.world):
            raise ConfigError(f"{checkpoint} was written by {state['world_size']} processes under {written_by}; "
                              f"DeepSpeed resumes only with the same number of processes and ZeRO stage "
                              f"(this run: {self.dist.world} under {this_run})")
        if self.zero is not None:
            self.zero.load(checkpoint / ENGINE_DIR)  # LoRA weights and this process's optimizer partition
        elif self.dist.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            self._load_adapter(adapter, checkpoint)
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=optimizer,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self._load_adapter(adapter, checkpoint)
            self.optimizer.load_state_dict(optimizer)
        states = rng["states"]
        if len(states) == self.dist.world:
            set_rng_state(states[self.dist.rank])
            self._restore_frozen_caches(checkpoint.parent.parent, state.get("frozen_cache") or [])
        else:  # another process count: the data order is the same, LoRA-dropout masks are not
            warnings.warn(f"{checkpoint} was written by {len(states)} process(es), resumed by {self.dist.world}: "
                          "LoRA-dropout masks will differ from an uninterrupted run")
            set_rng_state(states[0])
            torch.manual_seed(self.config.seed + 1 + self.dist.rank + state["step"])
        return state

    def _load_adapter(self, adapter: dict[str, torch.Tensor], checkpoint: Path) -> None:
        names = self._lora_names()
        missing = sorted(set(names) - set(adapter))
        if missing:
            raise ConfigError(f"{checkpoint}: the adapter lacks {len(missing)} LoRA weights (e.g. {missing[0]})")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, name in names.items():
                p, value = params[name], adapter[key]
                if hasattr(p, "device_mesh"):  # a DTensor shard: keep this process's part of the whole
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                p.copy_(value)

    def _restore_frozen_caches(self, out: Path, segments_per_rank: list[dict]) -> None:
        if len(segments_per_rank) != self.dist.world:
            return
        mine = segments_per_rank[self.dist.rank]
        try:
            loaded = {name: read_cache_segments(out, self.dist.rank, mine.get(name, []), self.device)
                      for name in self._frozen_caches()}
        except (OSError, ValueError) as err:  # a lost segment costs exactness, not the run
            warnings.warn(f"frozen-state cache not restored ({err}): it is recomputed, and the run may differ "
                          "from an uninterrupted one in the last bits")
            return
        self._cache_segments = {"files": {k: list(v) for k, v in mine.items()}, "saved": {}}
        for name, cache in self._frozen_caches().items():
            cache.items.update(loaded[name])
            self._cache_segments["saved"][name] = set(cache.items)
