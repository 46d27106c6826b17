"""Files that must survive a crash: atomic replacement (temp file, fsync, rename, fsync dir)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlink.common.errors import StorageError


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """The temp file a writer fills (and `commit`s) to replace `path` atomically.

    When writing fails (a full disk, an I/O error), the temp file is removed, so a failed write
    never holds the space the last good state may need, and the failure is raised as
    `StorageError` naming `path`; `path` itself is untouched.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc


def write_durably(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)


def publish_file(source: Path, destination: Path) -> None:
    """Copy a finished file into place atomically."""
    with replacing(destination) as tmp:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        commit(tmp, destination)


def make_durable(path: Path) -> None:
    """Make a file already renamed into place durable: its data, then its directory entry."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    _sync_directory(path.parent)


def commit(tmp: Path, path: Path) -> None:
    """Rename a fully written, fsynced `tmp` over `path` and make the rename itself durable."""
    tmp.replace(path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
