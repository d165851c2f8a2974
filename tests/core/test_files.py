"""Atomic writes (pyminigpt.files): the old file or directory, or the new one, never half of one."""

import json
import os
import stat

import pytest

from pyminigpt.files import atomic_directory, atomic_write


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name or p.name.endswith(".old"))


def test_atomic_write_text_bytes_and_writer(tmp_path):
    target = tmp_path / "sub" / "a.json"
    assert atomic_write(target, json.dumps({"x": "é"})) == target  # creates the parent
    assert json.loads(target.read_text(encoding="utf-8")) == {"x": "é"}
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    seen = []

    def writer(tmp):
        seen.append(tmp)
        tmp.write_text("from a writer")

    atomic_write(tmp_path / "plot.png", writer)
    assert (tmp_path / "plot.png").read_text() == "from a writer"
    assert seen[0].suffix == ".png" and seen[0].parent == tmp_path  # same directory, same suffix
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="did not create"):
        atomic_write(target, lambda tmp: None)
    with pytest.raises(TypeError, match="content must be"):
        atomic_write(target, 3)
    assert target.read_bytes() == b"old"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_atomic_directory_replaces_or_keeps(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        assert tmp != target and not target.exists()
        (tmp / "a.txt").write_text("one")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("two")
    assert (target / "a.txt").read_text() == "one" and (target / "nested" / "b.txt").read_text() == "two"
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "one" and leftovers(tmp_path) == []
    with atomic_directory(target) as tmp:
        (tmp / "c.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"] and leftovers(tmp_path) == []
