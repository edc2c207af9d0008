"""circuit_breakers.atomic: a result is either the old one or the whole new one, and looks like any other file."""
import os
import stat

import pytest

from circuit_breakers.atomic import atomic_directory, atomic_file, atomic_write_text


class Boom(Exception):
    pass


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_a_failing_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_file(target) as tmp:
            tmp.write_text("half of the new")
            raise Boom
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["results.json"]


def test_a_file_write_replaces_the_old_file(tmp_path):
    target = tmp_path / "sub" / "weights.bin"  # missing parents are made
    with atomic_file(target, fsync=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".")
        tmp.write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _names(target.parent) == ["weights.bin"]


def test_a_directory_write_replaces_an_old_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("from the old run")
    with atomic_directory(target, fsync=True) as tmp:
        assert not any(tmp.iterdir())
        (tmp / "config.json").write_text("{}")
    assert _names(target) == ["config.json"]
    assert _names(tmp_path) == ["model"]  # neither the temporary nor the old directory is left


def test_a_failing_directory_write_leaves_the_old_directory_and_no_temporary(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("new")
            raise Boom
    assert (target / "config.json").read_text() == "old"
    assert _names(tmp_path) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_are_ordinary_under_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("x")
        atomic_write_text(tmp_path / "t.txt", "x")
        with atomic_directory(tmp_path / "d") as tmp:
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask


def test_text_round_trips_as_utf8(tmp_path):
    text = "Grüße, 你好, \u2019quoted\u2019 — done\n"
    atomic_write_text(tmp_path / "a.txt", text)
    assert (tmp_path / "a.txt").read_bytes() == text.encode("utf-8")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == text
