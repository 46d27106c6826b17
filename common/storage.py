"""Files that must survive a crash: atomic replacement (temp file, fsync, rename, fsync dir)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_durably(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    commit(tmp, path)


def publish_file(source: Path, destination: Path) -> None:
    """Copy a finished file into place atomically."""
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.copyfile(source, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    commit(tmp, destination)


def commit(tmp: Path, path: Path) -> None:
    """Rename a fully written, fsynced `tmp` over `path` and make the rename itself durable."""
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
