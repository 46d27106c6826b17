"""One in-memory copy of a task's data set per process, however many clients it serves (a
simulation worker cuts many virtual clients' parts from it), read again when its files change."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_DEPTH = 3  # torchvision keeps its files two folders down (MNIST/raw/...)


def cached_until_changed(load: Callable[..., T]) -> Callable[..., T]:
    """Cache `load(data_dir, *, train)` (the two most recent calls), keyed by the names, sizes
    and modification times of the files under `data_dir`: replaced or repaired files are read
    again, never served stale."""

    @functools.lru_cache(maxsize=2)
    def cached(data_dir: Path | None, train: bool, stamp: tuple[object, ...]) -> T:
        return load(data_dir, train=train)

    @functools.wraps(load)
    def wrapper(data_dir: Path | None, *, train: bool) -> T:
        stamp = _stamp(Path(data_dir), _DEPTH) if data_dir is not None else ()
        return cached(data_dir, train, stamp)

    return wrapper


def _stamp(folder: Path, depth: int) -> tuple[object, ...]:
    entries: list[object] = []
    try:
        with os.scandir(folder) as listing:
            for entry in sorted(listing, key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=True):
                    if depth > 0:
                        entries.append((entry.name, _stamp(Path(entry.path), depth - 1)))
                else:
                    info = entry.stat()
                    entries.append((entry.name, info.st_size, info.st_mtime_ns))
    except OSError:
        return ("unreadable",)
    return tuple(entries)
