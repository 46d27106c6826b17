"""Result intake: the spool where uploads land (`state_dir/incoming`, its disk space reserved
per upload), and one client's result in flight, written there as it arrives and checked chunk
by chunk (size, offsets, BLAKE3 digest: given by a trailer after the chunks, or by the header
of an older client; a training update's values are measured on the way, server/inspection.py)
before the engine judges it whole."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import shutil
import threading
import time
import uuid
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
from fedlink.server.inspection import UpdateInspector
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
        discard: Callable[[Path], None] = lambda path: path.unlink(missing_ok=True),
        inspector: UpdateInspector | None = None,
    ) -> None:
        self.identity = identity
        self.header = header
        self.started = time.monotonic()  # the header was accepted: the upload's clock starts
        self.phase = phase
        self.spool = spool
        self._release = release  # gives back the disk space reserved for this upload
        self._discard = discard  # what becomes of the spool file when it is not kept
        # Measures a training update's values as they pass (server/inspection.py).
        self.inspector = inspector
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
                header.payload, self, max_size=max_size, encoding=encoding, digest_after=True
            )

    def write(self, data: bytes | memoryview) -> int:
        try:
            written = self._spool_file().write(data)
        except OSError as exc:
            raise spool_failure(exc) from exc
        if self.inspector is not None:
            self.inspector.write(data)
        return written

    def _spool_file(self) -> BinaryIO:
        if self._file is None:
            assert self.spool is not None
            # A recycled spool file (Spool.take) is rewritten in place, then cut to size.
            if self.spool.exists():
                self._file = open(self.spool, "r+b")  # noqa: SIM115 (closed in finish/discard)
            else:
                self._file = open(self.spool, "wb")  # noqa: SIM115 (closed in finish/discard)
        return self._file

    def add_chunk(self, offset: int, data: bytes | memoryview) -> None:
        if self._assembler is None:
            raise UpdateRejected("INVALID_ARGUMENT", "this result takes no payload chunks")
        with self._lock:
            if self._closed:
                raise UploadIncomplete("the upload ended before this chunk was stored")
            try:
                self._assembler.add(offset, data)
            except PayloadError as exc:
                raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None

    def add_trailer(self, digest: bytes) -> None:
        """The payload's digest, after its last chunk (the header left it out)."""
        if self._assembler is None:
            raise UpdateRejected("INVALID_ARGUMENT", "this result takes no payload trailer")
        with self._lock:
            try:
                self._assembler.add_trailer(digest)
            except PayloadError as exc:
                raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None

    def complete_payload(self) -> None:
        if self._assembler is None:
            return
        try:
            file = self._spool_file()
            file.truncate()  # what a recycled file held beyond this payload
            file.close()  # flushes: a full disk can show here first
        except OSError as exc:
            raise spool_failure(exc) from exc
        try:
            self._assembler.finish()
        except PayloadIncomplete as exc:
            raise UploadIncomplete(str(exc)) from None
        except PayloadError as exc:
            raise UpdateRejected("DATA_LOSS", str(exc)) from None

    def close(self, *, keep: bool) -> None:
        """Close the spool file; unless `keep`, hand it to `discard` (recycled or deleted)."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                # A failed flush was reported by complete_payload; the file is dropped anyway.
                with contextlib.suppress(OSError):
                    self._file.close()
            if self.spool is not None and not keep:
                self._discard(self.spool)
            if self.inspector is not None:
                self.inspector.close()
            self._release()
            self._release = lambda: None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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


# Spool files kept for reuse at most (each as large as the upload it held).
MAX_RECYCLED_FILES = 64


class Spool:
    """The directory uploads are written to, and the disk space promised to uploads in flight.

    An upload reserves its announced size before a byte moves, so a disk filled by uploads is
    refused up front (RESOURCE_EXHAUSTED, not held against the client) instead of failing
    halfway, and never takes `keep_free`: the room publishing the next model needs.

    A spool file that is done with (its update aggregated, or refused) is kept for a later
    upload to rewrite in place (`recycle`, `take`): a new file for every upload is new page
    cache for every upload, 4 GB a round for ten clients of a 100M-parameter model, and on a VM
    that hands freed memory back to its host that cost the coordinator more CPU than receiving
    the bytes (docs/large-models.md). Recycled files never cost an upload or the next model
    their room: they are deleted as soon as the disk space is wanted (`reserve`, `make_room`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # What a coordinator that stopped mid-round left behind.
        for stale in directory.glob("*.part"):
            stale.unlink()
        for stale in directory.glob("secagg-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self._reserved = 0
        self._recycled: list[Path] = []
        self._recycling = True
        self._lock = threading.Lock()
        self._logged = -math.inf

    def take(self) -> Path:
        """A path for a new upload's spool file: a recycled file when there is one."""
        with self._lock:
            if self._recycled:
                return self._recycled.pop()
        return self.directory / f"{uuid.uuid4().hex}.part"

    def recycle(self, path: Path) -> None:
        """A spool file no longer needed: kept for `take`, or deleted when enough are kept."""
        with self._lock:
            if self._recycling and len(self._recycled) < MAX_RECYCLED_FILES and path.exists():
                self._recycled.append(path)
                return
        path.unlink(missing_ok=True)

    def stop_recycling(self) -> None:
        """The run is over: delete the recycled files, and every spool file from now on."""
        with self._lock:
            self._recycling = False
            for path in self._recycled:
                path.unlink(missing_ok=True)
            self._recycled.clear()

    def make_room(self, size: int) -> None:
        """Delete recycled files until `size` bytes are free on the disk (or none is left)."""
        with self._lock:
            self._make_room_locked(size)

    def _make_room_locked(self, size: int) -> int:
        """Free bytes on the disk after deleting recycled files, largest first, as needed."""
        free = shutil.disk_usage(self.directory).free
        if free < size:  # the common case needs no stat of every recycled file
            self._recycled.sort(key=_size)
        while free < size and self._recycled:
            path = self._recycled.pop()
            path.unlink(missing_ok=True)
            free = shutil.disk_usage(self.directory).free
        return free

    def reserve(self, size: int, keep_free: int) -> int:
        """Reserve `size` bytes, or raise StorageError; returns what to `release` later."""
        with self._lock:
            try:
                free = self._make_room_locked(self._reserved + keep_free + size)
            except OSError as exc:
                raise spool_failure(exc) from exc
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
