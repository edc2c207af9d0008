"""Files and directories that are either complete or absent: written under a temporary sibling name,
renamed into place when done, removed on any error (a kill mid-write leaves only a dot-file behind).

    with atomic_file(out / "weights.safetensors") as tmp:   save_file(tensors, tmp)
    with atomic_directory(out / "model") as tmp:            model.save_pretrained(tmp)
    atomic_write_text(out / "config.yaml", text)

Every module that writes a result uses these; none renames by hand.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _create_beside(target: Path, create: Callable[[Path], None]) -> Path:
    """A new hidden sibling of `target`, made by `create`. Not mkstemp/mkdtemp: they make private entries,
    and widening those needs os.umask(0), which would change the umask of every thread for a moment.
    os.open/os.mkdir with ordinary modes let the kernel apply the umask, as for any other file."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{target.parent}: no free temporary name beside {target.name}")


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
    tmp = _create_beside(target, lambda path: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, target)
        if fsync:
            _fsync_directory(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory beside `target`; on success it replaces `target`, on error it
    is removed. A directory cannot be renamed over a full one, so an old `target` is first renamed aside
    and deleted only once the new one is in place: an error or a kill never loses both."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(target, lambda path: os.mkdir(path, 0o777))
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        aside = None
        if target.exists() or target.is_symlink():
            aside = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            if aside is not None:
                os.replace(aside, target)
            raise
        if fsync:
            _fsync_directory(target.parent)
        if aside is not None:
            _remove(aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) so that readers see the old contents or the new, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
