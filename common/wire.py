"""Payloads on the wire: bytes split into ordered chunks, announced by size and SHA-256.

A payload is never trusted until every byte arrived in order and the digest matched; the
receiver bounds memory (or disk) by the announced size, which it checks against its own limit
before accepting the first chunk.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedlink.common.errors import PayloadError, PayloadIncomplete

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
# Room for the protobuf framing around a chunk when sizing gRPC message limits.
MESSAGE_OVERHEAD = 64 << 10
ENCODING = "safetensors"
# Insecure (development) mode has no certificates: Join hands out a session token that the client
# echoes in this metadata key. Identity still never comes from a message field.
SESSION_METADATA_KEY = "fedlink-session"
# Status details that mean "the coordinator does not know you (it restarted): Join again".
JOIN_REQUIRED = "unknown client: call Join first"


@dataclass(frozen=True)
class PayloadInfo:
    size: int
    sha256: bytes
    encoding: str = ENCODING


@dataclass(frozen=True, eq=False)
class PayloadFile:
    """A payload kept on disk and streamed from there: memory stays one chunk per stream, and
    one file serves every client that downloads it.

    All of its streams read through one file descriptor (`os.pread` takes the offset, so they
    share it safely), opened by the first and closed when the payload is dropped: a coordinator
    handing the global model to 10,000 clients at once must not need 10,000 more descriptors
    (it ran out of them: EMFILE). The descriptor holds the sealed file even if its path is
    replaced meanwhile."""

    path: Path
    info: PayloadInfo
    _fd: int | None = field(default=None, init=False, repr=False)
    _opening: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def seal(cls, path: Path, encoding: str = ENCODING) -> PayloadFile:
        """Describe a finished file (size + SHA-256); it must not change afterwards."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(DEFAULT_CHUNK_SIZE):
                digest.update(block)
        size = path.stat().st_size
        return cls(path, PayloadInfo(size=size, sha256=digest.digest(), encoding=encoding))

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, bytes]]:
        check_chunk_size(chunk_size)
        fd = self._descriptor()
        for offset in range(0, self.info.size, chunk_size):
            yield offset, os.pread(fd, min(chunk_size, self.info.size - offset), offset)

    def _descriptor(self) -> int:
        with self._opening:
            if self._fd is None:
                fd = os.open(self.path, os.O_RDONLY)
                object.__setattr__(self, "_fd", fd)  # frozen: set once, here
                weakref.finalize(self, os.close, fd)
                return fd
            return self._fd


def check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise PayloadError(
            f"chunk size {chunk_size} is out of range; use {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes"
        )


class ByteSink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class PayloadAssembler:
    """Checks and stores the chunks of one announced payload as they arrive.

    `encoding` is what the receiver expects at this point of the protocol (a model, or one of
    secure aggregation's messages): a payload announced as anything else is refused up front.
    """

    def __init__(
        self, info: PayloadInfo, sink: ByteSink, *, max_size: int, encoding: str = ENCODING
    ) -> None:
        if info.encoding != encoding:
            raise PayloadError(f"unsupported payload encoding {info.encoding!r}; use {encoding!r}")
        if len(info.sha256) != hashlib.sha256().digest_size:
            raise PayloadError("payload SHA-256 digest must be 32 bytes")
        if info.size <= 0:
            raise PayloadError("payload size must be positive")
        if info.size > max_size:
            raise PayloadError(
                f"payload of {info.size} bytes exceeds the limit of {max_size} bytes"
            )
        self._info = info
        self._sink = sink
        self._hash = hashlib.sha256()
        self.received = 0

    def add(self, offset: int, data: bytes) -> None:
        if offset != self.received:
            raise PayloadError(
                f"chunk at offset {offset} arrived out of order; expected offset {self.received}"
            )
        if not data:
            raise PayloadError(f"empty chunk at offset {offset}")
        if self.received + len(data) > self._info.size:
            raise PayloadError(
                f"chunks exceed the announced payload size of {self._info.size} bytes"
            )
        self._hash.update(data)
        self._sink.write(data)
        self.received += len(data)

    def finish(self) -> None:
        if self.received != self._info.size:
            raise PayloadIncomplete(
                f"payload truncated: received {self.received} of {self._info.size} bytes"
            )
        if self._hash.digest() != self._info.sha256:
            raise PayloadError("payload SHA-256 does not match the announced digest")
