"""Checkpoints, resuming, and the checks that keep a run from being lost.

A checkpoint is a directory OUT/checkpoints/step-N holding everything needed to continue step N+1
exactly as an uninterrupted run would:

    adapter/              the LoRA weights (PEFT format: also usable on its own)
    optimizer.pt          AdamW's state
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
from array import array
from pathlib import Path
from typing import Sequence

import torch

from .config import ConfigError, RRConfig, read_yaml

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
    return sum(t.numel() * t.element_size() for t in tensors)


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
