"""Giving freed memory back to the operating system.

glibc keeps memory that gRPC's threads freed in their malloc arenas instead of returning it: after
a flood of connections ends, the coordinator's resident memory stayed about 50 MiB above its
baseline for good (benchmarks/floods.py). `malloc_trim(0)` releases the free pages of every
arena; a daemon thread calls it now and then. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# Trimming walks every arena's free lists: milliseconds, cheap at this interval.
TRIM_INTERVAL_SECONDS = 10.0


def _malloc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def start_memory_trim(stop: threading.Event, interval: float = TRIM_INTERVAL_SECONDS) -> None:
    """Return freed heap memory to the system every `interval` seconds until `stop` is set."""
    trim = _malloc_trim()
    if trim is None:
        log.debug("malloc_trim is not available: freed memory stays with the allocator")
        return

    def loop() -> None:
        while not stop.wait(interval):
            trim()

    threading.Thread(target=loop, name="memory-trim", daemon=True).start()
