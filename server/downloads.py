"""Download messages, framed once and shared by the streams that send the same payload.

Every sampled client downloads the same global model at about the same time. Framed per stream,
each chunk was read from the page cache and copied into its message once per client, on the
event loop that every call shares (`server/transport.py`): with ten clients of a 100M-parameter
model that loop was the busiest thread of a round. Here a chunk message of a sealed payload file
is built by the first stream that needs it and kept, within a fixed budget, for the others.

What is kept is keyed by the payload's digest, size and offset, so a message is only ever handed
to a stream of the very same bytes. The budget bounds the memory (the least recently used
messages go first); a stream that falls behind the others only builds its own chunks again, as
every stream did before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Generator

from fedlink.common.frames import chunk_message
from fedlink.common.wire import Payload, PayloadFile, check_chunk_size

# Chunk messages kept for the streams in flight: 64 chunks of the default 1 MiB. Clients that
# started together stay within that of each other (measured: 100m x 10, benchmarks/transport.py).
SHARED_FRAMES_BYTES = 64 << 20

_Key = tuple[bytes, int, int, int]  # digest, size, chunk size, offset


class SharedFrames:
    """The chunk messages of the payloads being downloaded, within `budget` bytes."""

    def __init__(self, budget: int = SHARED_FRAMES_BYTES) -> None:
        self._budget = budget
        self._kept: OrderedDict[_Key, bytes] = OrderedDict()
        self._kept_bytes = 0
        self._lock = threading.Lock()  # streams run on the event loop; the lock is for others
        self.built = 0  # messages framed here (the rest were shared)
        self.shared = 0

    def messages(
        self, payload: Payload, chunk_size: int
    ) -> Generator[tuple[bytes, int], None, None]:
        """(chunk message, payload bytes in it) for every chunk of `payload`, in order. Only a
        sealed file's messages are shared; any other payload (a secure-aggregation message to
        one client) is framed as it is sent."""
        check_chunk_size(chunk_size)
        if not isinstance(payload, PayloadFile):
            for offset, parts in payload.chunks(chunk_size):
                yield chunk_message(offset, parts), sum(memoryview(p).nbytes for p in parts)
            return
        info = payload.info
        with payload.stream() as read:
            for offset in range(0, info.size, chunk_size):
                size = min(chunk_size, info.size - offset)
                key = (info.blake3, info.size, chunk_size, offset)
                message = self._take(key)
                if message is None:
                    message = chunk_message(offset, [read(offset, size)])
                    self._keep(key, message)
                yield message, size

    def _take(self, key: _Key) -> bytes | None:
        with self._lock:
            message = self._kept.get(key)
            if message is not None:
                self._kept.move_to_end(key)
                self.shared += 1
            return message

    def _keep(self, key: _Key, message: bytes) -> None:
        with self._lock:
            self.built += 1
            if len(message) > self._budget or key in self._kept:
                return
            self._kept[key] = message
            self._kept_bytes += len(message)
            while self._kept_bytes > self._budget:
                _, dropped = self._kept.popitem(last=False)
                self._kept_bytes -= len(dropped)
