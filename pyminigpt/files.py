"""Atomic writes: a reader (or a crash) sees the old file or directory or the new one, never half of one.

    atomic_write(path, "text")                       str (UTF-8) or bytes
    atomic_write(path, lambda tmp: save_file(t, tmp))  a writer that fills a temporary path
    with atomic_directory(path) as tmp:              fill tmp/; on success it becomes path
        ...

A file is written to a temporary name in the same directory (so the final rename stays on
one file system), flushed to disk with fsync, then moved over `path` with os.replace;
the directory entry is fsynced too. A directory is filled as `<name>.tmp/`, every file
in it fsynced; then an existing `<name>` becomes `<name>.old`, `<name>.tmp` becomes
`<name>`, and `<name>.old` is removed. At every instant `<name>` or `<name>.old` is
complete (`checkpoint.resolve_checkpoint` falls back to `.old`). On an exception the
temporary file or directory is removed and the old one stays as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_directory", "atomic_write", "fsync_dir"]

Content = Union[str, bytes, Callable[[Path], object]]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write `content` to `path` atomically; returns the path.

    content: a str (written as UTF-8), bytes, or a function `write(tmp_path)` that creates
    the file at the temporary path it is given (safetensors' save_file, matplotlib's
    savefig: the temporary name keeps `path`'s suffix, so a format guessed from it holds).
    The parent directory is created if needed. The new file gets the usual permissions
    (the process umask), as `open` would give it.
    """
    path = Path(path)
    if isinstance(content, str):
        content = content.encode("utf-8")
    if not isinstance(content, (bytes, bytearray)) and not callable(content):
        raise TypeError(f"content must be str, bytes or a function of a path, got {type(content).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        if callable(content):
            content(tmp)
            if not tmp.is_file():
                raise FileNotFoundError(f"the writer for {str(path)!r} did not create its temporary file")
            _fsync_file(tmp)
        else:
            with open(tmp, "xb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_directory(path) as tmp:` fill `tmp`; when the block ends normally it replaces `path`.

    A stale `<name>.tmp/` from an earlier crash is cleared first. If the block raises, the
    temporary directory is removed and `path` is untouched.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in sorted(tmp.rglob("*")):
            if file.is_file():
                _fsync_file(file)
        for folder in sorted({file.parent for file in tmp.rglob("*")} | {tmp}):
            fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # keep the complete previous version as `.old` until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
