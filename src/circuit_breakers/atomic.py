"""Files and directories that are either complete or absent: written under a temporary sibling name,
renamed into place when done, removed on any error (a kill mid-write leaves only a dot-file behind).

    with atomic_file(out / "weights.safetensors") as tmp:   save_file(tensors, tmp)
    with atomic_directory(out / "model") as tmp:            model.save_pretrained(tmp)
    atomic_write_text(out / "config.yaml", text)

Every module that writes a result uses these; none renames by hand.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _ordinary_permissions(path: str | Path, mode: int) -> None:
    """mkstemp/mkdtemp make private entries; the result should look like any other file or directory."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory and everything under it, to disk (a checkpoint must survive a power cut)."""
    path = Path(path)
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
    elif path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(path if path.is_dir() else path.parent)


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(target: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _ordinary_permissions(tmp, 0o666)
        if fsync:
            fsync_path(Path(tmp))
        os.replace(tmp, target)
        if fsync:
            _fsync_directory(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory beside `target`; on success it replaces `target` (an old
    `target` is removed first), on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        _ordinary_permissions(tmp, 0o777)
        if fsync:
            fsync_path(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        if fsync:
            _fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) so that readers see the old contents or the new, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
