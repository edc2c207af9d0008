"""Checkpoints, resuming, and the checks that keep a run from being lost.

A checkpoint is a directory OUT/checkpoints/step-N holding everything needed to continue step N+1
exactly as an uninterrupted run would:

    adapter/              the LoRA weights (PEFT format: also usable on its own)
    optimizer.pt          AdamW's state (under DeepSpeed instead: deepspeed/, the engine's own files,
                          one optimizer partition per process): written and read by the run's
                          parallel strategy (parallel.py, zero.py)
    rng.json              python, numpy, torch CPU and CUDA RNG states, one entry per process

No file in a checkpoint is a pickle (a pickle runs code when loaded): tensors are safetensors or
`torch.save` files read with `weights_only=True`, everything else JSON.
    trainer_state.json    the step, how many batches each set's sampler has drawn, the config, a
                          fingerprint of the tokenised data (resuming on other data is an error) and
                          the frozen-state cache segments it needs (OUT/checkpoints/frozen-cache/)

It is written into a temporary sibling directory and renamed into place when complete; older
checkpoints are deleted only after that, keeping the newest `keep_checkpoints`. A run killed at any
moment therefore leaves at least the last complete checkpoint. `Checkpointer` does all of this for
the trainer, from the state it is handed.
"""

from __future__ import annotations

import dataclasses

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
from typing import Sequence

import torch
from torch import nn

from ..atomic import atomic_directory, atomic_write_text
from ..config import ConfigError, RRConfig, read_yaml
from .frozen_cache import CacheSegments, FrozenStateCache
from .parallel import Distributed, Parallel

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.json"
LEGACY_RNG_FILE = "rng.pt"  # a pickle, written before 2026-11-29: never loaded
ADAPTER_DIR = "adapter"
LOG_FILE = "train_log.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys that may differ between a checkpoint and the run resuming it: none of them changes the result.
RESUMABLE_OVERRIDES = ("device", "save_every", "keep_checkpoints", "frozen_cache_gb", "gradient_checkpointing",
                       "log_every", "checkpoint_frozen_cache")


class OutputDirError(ConfigError):
    """An output directory that cannot hold the run (not writable, too little free space)."""


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite; the message names the step and the last checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training into `out` stopped by Ctrl-C (or SIGTERM, which the CLI turns into one) during optimizer step
    `step`; `checkpoint` is the newest complete checkpoint (None: none was written). A KeyboardInterrupt, so
    that nothing catching Exception swallows it; the CLI says how to resume."""

    def __init__(self, step: int, checkpoint: Path | None, out: Path | None) -> None:
        super().__init__()
        self.step, self.checkpoint, self.out = step, checkpoint, out


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
            for image in getattr(item, "images", ()):  # the same ids over other pictures are other data
                digest.update(image.encode() if isinstance(image, str) else hashlib.sha256(bytes(image)).digest()
                              if isinstance(image, (bytes, bytearray)) else b"<image>")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states as JSON values (python's Mersenne Twister, numpy's, torch's CPU and CUDA)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}
    try:
        import numpy as np
        kind, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "numpy" in state:
        import numpy as np
        saved = state["numpy"]
        np.random.set_state((saved["kind"], np.array(saved["key"], dtype=np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
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
    current = config.to_dict()
    # A key the checkpoint's config lacks was added since (e.g. packing): it ran with the default.
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(RRConfig)}
    saved = {**{k: defaults[k] for k in current if k in defaults}, **state["config"]}
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
    target = Path(out) / CHECKPOINTS / f"step-{step}"
    with atomic_directory(target, fsync=True) as tmp:
        write_contents(tmp)
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


def non_finite_message(step: int, values: dict, out: Path | None, last_checkpoint: Path | None,
                       save_every: int) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    if last_checkpoint is not None:
        tail = (f"the last good checkpoint is {last_checkpoint}; lower lr (or raise max_grad_norm's "
                f"strictness) and continue with `circuit-breakers train --resume {out}`")
    elif out is not None and save_every:
        tail = f"no checkpoint had been written yet (save_every={save_every})"
    else:
        tail = "no checkpoints are written (no output directory or save_every=0)"
    return f"step {step}: loss or gradient norm is not finite ({shown}); training stopped; {tail}"


# ---------------------------------------------------------------- the trainer's checkpointer


class Checkpointer:
    """One run's output directory and checkpoints: checked before the first step, a checkpoint every
    `save_every` steps, restored on `--resume`. Everything it saves is handed to it as arguments."""

    def __init__(self, out: Path, config: RRConfig, dist: Distributed, parallel: Parallel, fingerprint: str) -> None:
        self.out, self.config, self.dist, self.parallel = Path(out), config, dist, parallel
        self.fingerprint = fingerprint  # of the tokenised data: resuming on other data is an error
        self.segments = CacheSegments(self.out / CHECKPOINTS, dist.rank)
        self.last: Path | None = None  # the newest complete checkpoint

    @property
    def log_path(self) -> Path:
        return self.out / LOG_FILE

    def newest(self) -> Path | None:
        """The newest complete checkpoint on disk (what `--resume OUT` continues from): also right when an
        interruption lands between a checkpoint's rename into place and `last` being set."""
        found = list_checkpoints(self.out)
        return found[-1] if found else self.last

    def prepare(self, resume: str | os.PathLike | bool | None, *, adapter_bytes: int, model_bytes: int,
                cache_bytes: int) -> Path | None:
        """Before the first step (rank 0 checks, every process gets the answer): the directory is writable
        and roomy enough, the config and the log are in place; returns the checkpoint to resume from."""
        return self.dist.on_main(lambda: self._prepare(resume, adapter_bytes, model_bytes, cache_bytes))

    def _prepare(self, resume, adapter_bytes: int, model_bytes: int, cache_bytes: int) -> Path | None:
        config, out = self.config, self.out
        check_writable(out)
        checkpoint = None
        if resume is True:
            found = list_checkpoints(out)
            checkpoint = found[-1] if found else None
        elif resume:
            checkpoint = resolve_resume(resume)[1]
        done = json.loads((checkpoint / STATE_FILE).read_text())["step"] if checkpoint else 0
        per_checkpoint = 3 * adapter_bytes + 2**16  # LoRA weights + AdamW's two moments (+ RNG and state files)
        checkpoints = min(config.keep_checkpoints, (config.steps - done) // config.save_every) if config.save_every else 0
        cache = cache_bytes if checkpoints and config.checkpoint_frozen_cache else 0  # saved once, in segments
        check_free_space(out, checkpoint_bytes=per_checkpoint, checkpoints=checkpoints,
                         other_bytes={"final adapter": adapter_bytes, "merged model": model_bytes,
                                      **({"frozen-state cache": cache} if cache else {})})
        remove_stale_temporaries(out)
        config.save(out / "config.yaml")
        if checkpoint is None:
            self.log_path.unlink(missing_ok=True)
        else:  # steps logged after the checkpoint are done again: drop them (and a half-written line)
            kept = read_log(self.log_path, done)
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
        return checkpoint

    def save(self, step: int, model: nn.Module, caches: dict[str, FrozenStateCache]) -> None:
        """Write OUT/checkpoints/step-N (every process calls it: the LoRA and optimizer states may be
        gathered from all of them)."""
        rng = self.dist.gather_objects(rng_state())
        try:
            outcome = (self.segments.append(caches if self.config.checkpoint_frozen_cache else {}, step), None)
        except OSError as err:
            outcome = (None, err)
        outcomes = self.dist.gather_objects(outcome)
        for _, err in outcomes:
            if err is not None:
                raise err
        state = {"step": step, "batches_drawn": {"circuit_breaker": step, "retain": step},
                 "world_size": self.dist.world, "parallel": self.parallel.name, "config": self.config.to_dict(),
                 "data_fingerprint": self.fingerprint,
                 "frozen_cache": [segments for segments, _ in outcomes]}
        lora = self.parallel.full_lora_state(model)
        write_optimizer = self.parallel.save_optimizer(self.out / CHECKPOINTS / f".step-{step}-engine")

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp / ADAPTER_DIR, state_dict=lora)
            write_optimizer(tmp)
            (tmp / RNG_FILE).write_text(json.dumps({"world_size": self.dist.world, "states": rng}))
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1) + "\n")  # last: marks it complete
        self.last = self.dist.on_main(lambda: write_checkpoint(self.out, step, write, self.config.keep_checkpoints))

    def load(self, checkpoint: Path, model: nn.Module, caches: dict[str, FrozenStateCache], device) -> dict:
        """Restore LoRA weights, optimizer, RNG states and frozen caches; returns the checkpoint's state."""
        def read():
            state = json.loads((checkpoint / STATE_FILE).read_text())
            check_resumable(state, self.config, self.fingerprint, checkpoint)
            if not (checkpoint / RNG_FILE).is_file() and (checkpoint / LEGACY_RNG_FILE).is_file():
                raise ConfigError(f"{checkpoint} was written by an older circuit-breakers: its RNG states are a "
                                  f"pickle ({LEGACY_RNG_FILE}), which is not loaded (a pickle can run code); "
                                  "resume it with the version that wrote it, or start the run again")
            return state, json.loads((checkpoint / RNG_FILE).read_text())
        state, rng = self.dist.on_main(read)
        self.parallel.check_resume(state.get("parallel", "single"), state.get("world_size", 1), checkpoint)
        self.parallel.load(checkpoint, model, checkpoint / ADAPTER_DIR / "adapter_model.safetensors")
        states, world, rank = rng["states"], self.dist.world, self.dist.rank
        segments = state.get("frozen_cache") or []
        if len(states) == world:
            set_rng_state(states[rank])
            if len(segments) == world:
                self.segments.restore(caches, segments[rank], device)
        else:  # another process count: the data order is the same, LoRA-dropout masks are not
            warnings.warn(f"{checkpoint} was written by {len(states)} process(es), resumed by {world}: "
                          "LoRA-dropout masks will differ from an uninterrupted run")
            set_rng_state(states[0])
            torch.manual_seed(self.config.seed + 1 + rank + state["step"])
        self.last = checkpoint
        return state
