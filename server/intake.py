"""Result intake: the spool where uploads land (`state_dir/incoming`, its disk space reserved
per upload), and one client's result in flight, written there as it arrives and checked chunk
by chunk (size, offsets, SHA-256) before the engine validates it whole."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fedlink.common.errors import (
    PayloadError,
    PayloadIncomplete,
    StorageError,
    UpdateRejected,
    UploadIncomplete,
)
from fedlink.common.wire import PayloadAssembler
from fedlink.server.phases import Phase, ResultHeader

log = logging.getLogger(__name__)


class ResultUpload:
    """One client's result in flight: header accepted, payload spooled to disk as it arrives."""

    def __init__(
        self,
        identity: str,
        header: ResultHeader,
        phase: Phase,
        spool: Path | None,
        *,
        max_size: int,
        encoding: str,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self.identity = identity
        self.header = header
        self.started = time.monotonic()  # the header was accepted: the upload's clock starts
        self.phase = phase
        self.spool = spool
        self._release = release  # gives back the disk space reserved for this upload
        self._file: BinaryIO | None = None
        self._assembler: PayloadAssembler | None = None
        # Chunks are written by the transport's workers while the call may end on the event
        # loop: closing waits for a write in progress, and nothing is written once closed.
        self._lock = threading.Lock()
        self._closed = False
        if header.payload is not None and spool is not None:
            # The spool file is created by the first write, on a worker: creating files costs
            # disk I/O, which the event loop never waits for.
            self._assembler = PayloadAssembler(
                header.payload, self, max_size=max_size, encoding=encoding
            )

    def write(self, data: bytes) -> int:
        try:
            return self._spool_file().write(data)
        except OSError as exc:
            raise spool_failure(exc) from exc

    def _spool_file(self) -> BinaryIO:
        if self._file is None:
            assert self.spool is not None
            self._file = open(self.spool, "wb")  # noqa: SIM115 (closed in finish/discard)
        return self._file

    def add_chunk(self, offset: int, data: bytes) -> None:
        if self._assembler is None:
            raise UpdateRejected("INVALID_ARGUMENT", "this result takes no payload chunks")
        with self._lock:
            if self._closed:
                raise UploadIncomplete("the upload ended before this chunk was stored")
            try:
                self._assembler.add(offset, data)
            except PayloadError as exc:
                raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None

    def complete_payload(self) -> None:
        if self._assembler is None:
            return
        try:
            self._spool_file().close()  # flushes: a full disk can show here first
        except OSError as exc:
            raise spool_failure(exc) from exc
        try:
            self._assembler.finish()
        except PayloadIncomplete as exc:
            raise UploadIncomplete(str(exc)) from None
        except PayloadError as exc:
            raise UpdateRejected("DATA_LOSS", str(exc)) from None

    def close(self, *, keep: bool) -> None:
        """Close the spool file; unless `keep`, delete it."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                # A failed flush was reported by complete_payload; the file is dropped anyway.
                with contextlib.suppress(OSError):
                    self._file.close()
            if self.spool is not None and not keep:
                self.spool.unlink(missing_ok=True)
            self._release()
            self._release = lambda: None


def spool_failure(exc: OSError) -> StorageError:
    """What a client is told when its upload cannot be spooled: not its fault, so it backs off
    and retries (RESOURCE_EXHAUSTED) instead of being rejected."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError("coordinator disk full: cannot store this upload now; retry later")
    return StorageError(
        f"coordinator storage error ({exc.strerror or exc}): cannot store this upload now; "
        "retry later"
    )


# Seconds between log lines about uploads refused because the coordinator's disk is full.
STORAGE_LOG_INTERVAL = 60.0


class Spool:
    """The directory uploads are written to, and the disk space promised to uploads in flight.

    An upload reserves its announced size before a byte moves, so a disk filled by uploads is
    refused up front (RESOURCE_EXHAUSTED, not held against the client) instead of failing
    halfway, and never takes `keep_free`: the room publishing the next model needs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # What a coordinator that stopped mid-round left behind.
        for stale in directory.glob("*.part"):
            stale.unlink()
        for stale in directory.glob("secagg-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self._reserved = 0
        self._lock = threading.Lock()
        self._logged = -math.inf

    def reserve(self, size: int, keep_free: int) -> int:
        """Reserve `size` bytes, or raise StorageError; returns what to `release` later."""
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError as exc:
            raise spool_failure(exc) from exc
        with self._lock:
            if free - self._reserved - keep_free < size:
                error = spool_failure(OSError(errno.ENOSPC, "No space left on device"))
                self._log_refusal_locked(error)
                raise error
            self._reserved += size
        return size

    def release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def log_refusal(self, error: StorageError) -> None:
        with self._lock:
            self._log_refusal_locked(error)

    def _log_refusal_locked(self, error: StorageError) -> None:
        # One line a minute: every client retrying against a full disk must not flood the log.
        now = time.monotonic()
        if now - self._logged >= STORAGE_LOG_INTERVAL:
            self._logged = now
            log.error("%s (uploads are refused until there is space in %s)", error, self.directory)
