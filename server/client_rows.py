"""Per-client rows: what the coordinator knows of each client in each round, in `clients.jsonl`.

One JSON object per client per round attempt, beside metrics.jsonl in the run directory: whether
the client was sampled, each phase's result (accepted, rejected and why, or missing) with the
examples it reported, its upload time and the metrics it sent, and the bytes it moved. Only
what arrives at the coordinator anyway, and never under secure aggregation, where the
coordinator is meant to learn sums, not one client's numbers (`ClientRows.for_run`). The
privacy trade-off is in docs/privacy.md, the format in docs/operations.md.

The round engine reports events as they happen (a phase opened, a result accepted or rejected,
a transfer ended), keyed by the phase's task id so that a late event of an earlier attempt
cannot land in a later one, and closes the attempt when the round is done or repeated: its rows
are then appended in one write. `ClientRowsFile` keeps the file bounded by rotating it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlink.common.logs import escape_for_log
from fedlink.server.config import ServerConfig
from fedlink.server.phases import Phase, TaskKind

log = logging.getLogger(__name__)

FILE_NAME = "clients.jsonl"
# Characters kept of an identity (certificate names are short; this bounds a forged one) and of
# a rejection reason (as the Admin service keeps them).
MAX_IDENTITY = 256
MAX_REASON = 500
# The phases a plain round is made of, under the names the rows use.
_PHASES = {TaskKind.TRAIN: "train", TaskKind.EVALUATE: "evaluate"}


@dataclass
class _Result:
    """One client's result in one phase."""

    result: str  # accepted | rejected
    reason: str = ""
    num_examples: int | None = None
    upload_seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Attempt:
    """The phases of the round attempt in progress and what happened in them."""

    round: int
    attempt: int
    sampled: frozenset[str]
    phases: dict[str, str] = field(default_factory=dict)  # task id -> "train" | "evaluate"
    results: dict[tuple[str, str], _Result] = field(default_factory=dict)  # (task id, client)
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)


class ClientRowsFile:
    """Appends rows to `run_dir/clients.jsonl`, rotating it to `clients.jsonl.1` (replacing the
    previous one) before it would pass `max_bytes`: the two files hold at most 2 x max_bytes."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = directory / FILE_NAME
        self.rotated = directory / f"{FILE_NAME}.1"
        self._max_bytes = max_bytes

    def clear(self) -> None:
        """A new run: no rows of an earlier run in this directory stay (also when this run
        writes none)."""
        self.path.unlink(missing_ok=True)
        self.rotated.unlink(missing_ok=True)

    def resume(self) -> None:
        """A resumed run appends; a row cut short by a crash is ended, so the next one is whole."""
        try:
            with open(self.path, "rb+") as f:
                if f.seek(0, os.SEEK_END) == 0:
                    return
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        except FileNotFoundError:
            pass

    def append(self, rows: list[dict[str, Any]]) -> None:
        """All of an attempt's rows in one write (readers tailing the file see whole rounds), in
        ASCII: identities and reasons are escaped, whatever a certificate or client put there."""
        if not rows:
            return
        data = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows).encode()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self._max_bytes:
            os.replace(self.path, self.rotated)
        with open(self.path, "ab") as f:
            f.write(data)


class ClientRows:
    """Collects the round attempt in progress from the engine's events; `close` writes its rows.

    Thread-safe: results and transfers are reported from the transport's workers and event loop.
    """

    def __init__(self, file: ClientRowsFile, clock: Callable[[], float] = time.time) -> None:
        self._file = file
        self._clock = clock
        self._lock = threading.Lock()
        self._attempt: _Attempt | None = None
        self._last_round = 0
        self._attempts_of_round = 0

    @classmethod
    def for_run(cls, config: ServerConfig, *, resuming: bool) -> ClientRows | None:
        """The rows `config` asks for: none when they are off or under secure aggregation."""
        file = ClientRowsFile(config.run_dir, config.client_rows_max_mb << 20)
        if resuming:
            file.resume()
        else:
            file.clear()
        if not config.client_rows or config.secure_aggregation:
            return None
        return cls(file)

    # ---- the engine's events ---------------------------------------------------------------

    def opened(self, phase: Phase) -> None:
        """A phase opened: a training phase starts a new attempt, evaluation joins the current."""
        name = _PHASES.get(phase.kind)
        if name is None:
            return
        with self._lock:
            if phase.kind is TaskKind.TRAIN:
                if phase.round != self._last_round:
                    self._last_round, self._attempts_of_round = phase.round, 0
                self._attempt = _Attempt(phase.round, self._attempts_of_round, phase.participants)
                self._attempts_of_round += 1
            if self._attempt is not None and self._attempt.round == phase.round:
                self._attempt.phases[phase.task_id] = name

    def accepted(
        self,
        phase: Phase,
        identity: str,
        num_examples: int,
        metrics: Mapping[str, float],
        upload_seconds: float,
    ) -> None:
        result = _Result("accepted", "", num_examples, round(upload_seconds, 3), dict(metrics))
        self._record(phase, identity, result)

    def rejected(self, phase: Phase, identity: str, reason: str) -> None:
        self._record(phase, identity, _Result("rejected", escape_for_log(reason, MAX_REASON)))

    def transferred(self, task_id: str, identity: str, *, down: int = 0, up: int = 0) -> None:
        """A model download or a result upload of `task_id` ended (complete or not)."""
        with self._lock:
            attempt = self._attempt
            if attempt is None or task_id not in attempt.phases:
                return
            if down:
                attempt.bytes_down[identity] = attempt.bytes_down.get(identity, 0) + down
            if up:
                attempt.bytes_up[identity] = attempt.bytes_up.get(identity, 0) + up

    def close(self, *, completed: bool, connected: Collection[str]) -> None:
        """The attempt is over: append a row for every client sampled and every other client
        connected at its end. `completed`: the round counted (else it is repeated or the run
        gives up). A failure to write costs the rows, never the run."""
        with self._lock:
            attempt, self._attempt = self._attempt, None
        if attempt is None:
            return
        rows = _rows(attempt, completed, connected, self._clock())
        try:
            self._file.append(rows)
        except OSError as exc:
            log.warning(
                "could not write round %d's per-client rows to %s: %s",
                attempt.round,
                self._file.path,
                exc,
            )

    def _record(self, phase: Phase, identity: str, result: _Result) -> None:
        with self._lock:
            attempt = self._attempt
            if attempt is not None and phase.task_id in attempt.phases:
                attempt.results[(phase.task_id, identity)] = result


def _rows(
    attempt: _Attempt, completed: bool, connected: Collection[str], now: float
) -> list[dict[str, Any]]:
    rows = []
    for identity in sorted(attempt.sampled | set(connected)):
        row: dict[str, Any] = {
            "round": attempt.round,
            "attempt": attempt.attempt,
            "round_completed": completed,
            "client": escape_for_log(identity, MAX_IDENTITY),
            "sampled": identity in attempt.sampled,
            "bytes_down": attempt.bytes_down.get(identity, 0),
            "bytes_up": attempt.bytes_up.get(identity, 0),
            "time_unix": round(now, 3),
        }
        if identity in attempt.sampled:
            for task_id, name in attempt.phases.items():
                result = attempt.results.get((task_id, identity))
                row[name] = _phase_fields(result)
        rows.append(row)
    return rows


def _phase_fields(result: _Result | None) -> dict[str, Any]:
    if result is None:
        return {"result": "missing"}  # no result before the phase closed
    if result.result == "rejected":
        return {"result": "rejected", "reason": result.reason}
    return {
        "result": "accepted",
        "num_examples": result.num_examples,
        "upload_seconds": result.upload_seconds,
        "metrics": result.metrics,
    }
