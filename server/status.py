"""What the coordinator is doing, for its operators: the Admin service and the dashboard read it.

`RunStatus` is a small thread-safe record the round engine updates at a handful of points
(waiting for clients, a phase opened or closed, a client joined, was seen, left, delivered or
was refused) and the coordinator updates with each completed round. Readers take a `snapshot()`:
plain data, copied under the lock, so nothing they do can block or change the engine.
`RecentLogs` keeps the last log lines, escaped as the text log format escapes them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedlink.common.logs import escape_for_log

# A message kept in the ring buffer is cut to this many characters (a traceback is not kept).
MAX_LOG_MESSAGE = 1000
LOG_LINES = 200
# Completed rounds kept for the dashboard's curves; older ones stay in metrics.jsonl.
ROUND_HISTORY = 2000
# Characters of a rejection or departure reason kept per client.
MAX_REASON = 500

Clock = Callable[[], float]


@dataclass
class _Client:
    identity: str
    joined: bool = False
    last_seen_unix: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    last_result: str = ""
    last_error: str = ""
    excluded: bool = False


class RunStatus:
    """The run's state and each client's, as last reported by the engine."""

    def __init__(self, num_rounds: int, liveness_timeout: float, clock: Clock = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._liveness = liveness_timeout
        # Clients alive although silent: waiting in a long poll or downloading a task (they
        # send no heartbeats then). The engine's roster answers; without one, nobody.
        self._silent_but_alive: Callable[[], Collection[str]] = tuple
        self._num_rounds = num_rounds
        self._state = "starting"
        self._round = 0
        self._completed = 0
        self._phase = ""
        self._deadline = 0.0
        self._quorum = 0
        self._delivered = 0
        self._needed = 0
        self._bytes_round = 0
        self._participants: frozenset[str] = frozenset()
        self._clients: dict[str, _Client] = {}
        self._rounds: collections.deque[dict[str, Any]] = collections.deque(maxlen=ROUND_HISTORY)

    # ---- the engine's hooks --------------------------------------------------------------------

    def waiting_for_clients(self, round_number: int, needed: int) -> None:
        with self._lock:
            self._state, self._round, self._needed = "waiting for clients", round_number, needed

    def phase_opened(
        self,
        kind: str,
        round_number: int,
        timeout: float,
        quorum: int,
        participants: Collection[str],
    ) -> None:
        with self._lock:
            if round_number != self._bytes_round:  # each round's transfers count afresh
                self._bytes_round = round_number
                for client in self._clients.values():
                    client.bytes_down = client.bytes_up = 0
            self._state = "running"
            self._round, self._phase, self._quorum = round_number, kind, quorum
            self._deadline = self._clock() + timeout
            self._delivered, self._needed = 0, 0
            self._participants = frozenset(participants)

    def phase_closed(self) -> None:
        with self._lock:
            self._phase, self._deadline, self._participants = "", 0.0, frozenset()

    def client_joined(self, identity: str) -> None:
        with self._lock:
            client = self._client(identity)
            client.joined, client.last_seen_unix = True, self._clock()

    def count_as_alive(self, probe: Callable[[], Collection[str]]) -> None:
        """`probe()` names the clients that are alive although not seen lately (called by
        `snapshot`, without this object's lock held)."""
        self._silent_but_alive = probe

    def client_seen(self, identity: str) -> None:
        with self._lock:
            self._client(identity).last_seen_unix = self._clock()

    def client_left(self, identity: str, reason: str) -> None:
        with self._lock:
            client = self._client(identity)
            client.joined = False
            client.last_error = f"left: {escape_for_log(reason, MAX_REASON)}"

    def result_accepted(self, identity: str, round_number: int, kind: str) -> None:
        with self._lock:
            self._client(identity).last_result = f"round {round_number} {kind}: accepted"
            if round_number == self._round and kind == self._phase:
                self._delivered += 1

    def result_rejected(self, identity: str, round_number: int, kind: str, error: str) -> None:
        with self._lock:
            client = self._client(identity)
            client.last_result = f"round {round_number} {kind}: rejected"
            client.last_error = escape_for_log(error, MAX_REASON)

    def count_bytes(self, identity: str, *, down: int = 0, up: int = 0) -> None:
        with self._lock:
            client = self._client(identity)
            client.bytes_down += down
            client.bytes_up += up

    # ---- the coordinator's hooks ---------------------------------------------------------------

    def round_completed(self, record: Mapping[str, Any]) -> None:
        """A row of metrics.jsonl: a completed round (also each row read back on resume)."""
        with self._lock:
            self._rounds.append(dict(record))
            self._completed = max(self._completed, int(record.get("round", 0)))

    def excluded(self, identity: str, reason: str) -> None:
        with self._lock:
            client = self._client(identity)
            client.excluded, client.joined = True, False
            client.last_error = f"excluded: {escape_for_log(reason, MAX_REASON)}"

    def set_state(self, state: str) -> None:
        """ "stopping", "finished", "failed": the run as a whole, once the engine has no say."""
        with self._lock:
            self._state = state

    # ---- readers -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The run and its clients as plain data: the fields of the Admin service's RunStatus."""
        silent_but_alive = set(self._silent_but_alive())
        with self._lock:
            now = self._clock()
            clients = [
                {
                    **asdict(c),
                    "connected": c.joined
                    and (
                        now - c.last_seen_unix <= self._liveness or c.identity in silent_but_alive
                    ),
                    "sampled": c.identity in self._participants,
                }
                for c in sorted(self._clients.values(), key=lambda c: c.identity)
            ]
            for client in clients:
                del client["joined"]
            return {
                "state": self._state,
                "round": self._round,
                "num_rounds": self._num_rounds,
                "completed_rounds": self._completed,
                "phase": self._phase,
                "deadline_unix": self._deadline,
                "quorum": self._quorum,
                "delivered": self._delivered,
                "clients_needed": self._needed,
                "clients": clients,
                "updated_unix": now,
            }

    def rounds(self) -> list[dict[str, Any]]:
        """The completed rounds' metrics, oldest first (at most ROUND_HISTORY)."""
        with self._lock:
            return list(self._rounds)

    def _client(self, identity: str) -> _Client:
        client = self._clients.get(identity)
        if client is None:
            client = self._clients[identity] = _Client(identity)
        return client


class RecentLogs(logging.Handler):
    """The last `capacity` log records, each one escaped line (what `fedlink status` shows)."""

    def __init__(self, capacity: int = LOG_LINES, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = escape_for_log(record.getMessage(), MAX_LOG_MESSAGE)
        except Exception:  # a bad format string: logging's own policy is to never raise
            self.handleError(record)
            return
        line = {
            "time_unix": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        with self._guard:
            self._lines.append(line)

    def lines(self, limit: int = 0) -> list[dict[str, Any]]:
        with self._guard:
            lines = list(self._lines)
        return lines[-limit:] if limit > 0 else lines


def load_rounds(status: RunStatus, rows: Iterable[Mapping[str, Any]]) -> None:
    """Seed `status` with the rounds a resumed run completed before."""
    for row in rows:
        status.round_completed(row)
