"""The phase machine: the one place clients and the run loop meet.

Clients' events arrive from the transport (joined, left, seen, pulled, their result settled:
server/intake.py) and the run loop's from its own thread (open a phase, wait until it can close,
the run is over). `PhaseBoard` holds what both sides share (the roster, the open phase, whether
the run is stopping) behind one condition variable, and decides when a phase closes: everyone
answered, the deadline passed, or everyone still missing is gone. It knows nothing of gRPC, of
files or of aggregation, so it is unit-tested directly and driven in-process as over the network.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fedlink.common.errors import UpdateRejected
from fedlink.common.wire import JOIN_REQUIRED
from fedlink.server.client_rows import ClientRows
from fedlink.server.config import ServerConfig
from fedlink.server.monitoring import CoordinatorMetrics
from fedlink.server.phases import Phase, TaskKind, TaskOffer
from fedlink.server.roster import Roster, Wake
from fedlink.server.status import RunStatus

log = logging.getLogger(__name__)

# A pull that finds nothing to do returns WAIT after at most this long (the servicer draws
# between half and all of it), so idle streams are recycled. Each re-poll is a call the
# coordinator serves: 10,000 idle clients re-poll about 220 times a second (500 with 20 s
# polls). Keepalive pings (60 s) keep the connection open meanwhile.
LONG_POLL_SECONDS = 60.0
# How often an open phase looks at its deadline and at who is gone.
CLOSE_CHECK_SECONDS = 0.25


class PhaseBoard:
    def __init__(
        self,
        config: ServerConfig,
        status: RunStatus,
        metrics: CoordinatorMetrics,
        client_rows: ClientRows | None = None,
    ) -> None:
        self._config = config
        # Observers of the run: the status snapshot, Prometheus, and clients.jsonl's rows.
        self.status = status
        status.count_as_alive(self._silent_but_alive)
        self.metrics = metrics
        self.client_rows = client_rows
        self.cond = threading.Condition()  # guards everything below and each open Phase
        self.roster = Roster(config.liveness_timeout_seconds)
        self.phase: Phase | None = None
        self._stopping = False  # the run is over: clients are told to stop
        self._shutting_down = False  # this process is going away: clients retry elsewhen
        self._told_to_stop: set[str] = set()
        self._bytes_down = 0
        self._bytes_up = 0

    # ---- clients' events (from the transport) ----------------------------------------------

    def join(self, identity: str) -> None:
        with self.cond:
            if self.roster.join(identity, time.monotonic()):
                log.info("client %s joined (%d connected)", identity, self.roster.connected)
            self.status.client_joined(identity)
            self.cond.notify_all()

    def leave(self, identity: str, reason: str) -> None:
        """The client said it is going away: it is no longer alive, so the phase in progress
        closes without it (as if it had gone silent) and it is not sampled until it joins again.
        Forgotten from the known clients too, so `below_quorum = "wait"` does not wait for it."""
        with self.cond:
            if not self.roster.leave(identity):
                return
            self.status.client_left(identity, reason)
            log.warning(
                "client %s left (%d connected): %s", identity, self.roster.connected, reason
            )
            self.roster.wake([identity], time.monotonic())  # its waiting poll ends: JOIN_REQUIRED
            self.cond.notify_all()

    def touch(self, identity: str) -> bool:
        """Record a sign of life; False when the client has not joined this coordinator."""
        with self.cond:
            if not self.roster.seen(identity, time.monotonic()):
                return False
            self.status.client_seen(identity)
            return True

    @property
    def active(self) -> bool:
        return not (self._stopping or self._shutting_down)

    def poll_task(self, identity: str, wake: Wake | None = None) -> TaskOffer | None:
        """This client's task now, or None when it has nothing to do yet. With `wake`, and no
        task, `wake` is registered to be called (from any thread, once) when this client may have
        one: a phase it takes part in opened, the run stopped, or its interrupted upload may be
        retried. Only that client's waiters are woken, never every waiting poll."""
        with self.cond:
            if not self.roster.seen(identity, time.monotonic()):
                raise UpdateRejected("FAILED_PRECONDITION", JOIN_REQUIRED)
            self.status.client_seen(identity)
            if self._shutting_down:
                raise UpdateRejected(
                    "UNAVAILABLE", "the coordinator is shutting down; retry after it restarts"
                )
            if self._stopping:
                self._told_to_stop.add(identity)
                self.cond.notify_all()
                return TaskOffer(TaskKind.STOP)
            phase = self.phase
            if (
                phase is not None
                and phase.open
                and identity in phase.participants
                and identity not in phase.submitted
                and identity not in phase.finished
            ):
                if identity in phase.pulled:
                    log.info("round %d: handing the task to %s again", phase.round, identity)
                phase.pulled.add(identity)
                return TaskOffer(
                    kind=phase.kind,
                    task_id=phase.task_id,
                    round=phase.round,
                    seed=self.client_seed(phase.round, identity),
                    payload=phase.inboxes.get(identity, phase.download or phase.payload),
                    secagg=phase.secure.setup if phase.secure else None,
                )
            if wake is not None:
                self.roster.add_waiter(identity, wake)
            return None

    def wake(self, identity: str) -> None:
        """End `identity`'s waiting polls (they look again: e.g. its session was superseded)."""
        with self.cond:
            self.roster.wake([identity], time.monotonic())

    def cancel_wake(self, identity: str, wake: Wake) -> None:
        """Forget a `wake` registered by poll_task (the poll ended without being woken)."""
        with self.cond:
            self.roster.remove_waiter(identity, wake)

    def next_task(self, identity: str, timeout: float = LONG_POLL_SECONDS) -> TaskOffer:
        """Block until this client has a task, the federation stops, or `timeout` passes (WAIT).
        For callers in a thread of their own (in-process drivers, tests); the gRPC servicer
        waits on `poll_task`'s wake-up without a thread."""
        deadline = time.monotonic() + timeout
        while True:
            ready = threading.Event()
            wake = ready.set
            offer = self.poll_task(identity, wake)
            if offer is not None:
                return offer
            woken = ready.wait(max(0.0, deadline - time.monotonic()))
            self.cancel_wake(identity, wake)
            if not woken:
                return TaskOffer(TaskKind.WAIT)

    def tell_finished(self, identity: str) -> bool:
        """Whether the run is over; if it is, `identity` (joining now) counts as told so."""
        with self.cond:
            if not self._stopping:
                return False
            log.info("%s joined after the run finished; it is told so", identity)
            self._told_to_stop.add(identity)
            self.cond.notify_all()
            return True

    @contextmanager
    def downloading(self, identity: str) -> Iterator[None]:
        """While a task's payload streams to `identity` it counts as alive: clients send no
        heartbeats while a call of theirs is in progress, and a large model may take longer to
        download than the liveness timeout. (An upload counts from its header on: the phase's
        `submitted`.)"""
        with self.cond:
            self.roster.download_started(identity)
        try:
            yield
        finally:
            with self.cond:
                self.roster.download_ended(identity, time.monotonic())

    def count_bytes(self, identity: str, task_id: str, *, down: int = 0, up: int = 0) -> None:
        """A download or upload of `identity` for `task_id` ended, having moved these bytes."""
        if self.client_rows is not None:
            self.client_rows.transferred(task_id, identity, down=down, up=up)
        with self.cond:
            self._bytes_down += down
            self._bytes_up += up
        self.metrics.bytes_sent.inc(down)
        self.metrics.bytes_received.inc(up)

    def client_seed(self, round_number: int, identity: str) -> int:
        digest = hashlib.sha256(f"{self._config.seed}:{round_number}:{identity}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    # ---- the run loop's events ---------------------------------------------------------------

    def sample(
        self, round_number: int, attempt: int, avoid: frozenset[str], stop: threading.Event
    ) -> list[str] | None:
        """Wait until enough clients are available, then pick this round's participants.

        "retry" samples among live clients, avoiding those that failed the previous attempt
        when enough others are available; "wait" samples among every client that has joined,
        so a crash does not change who takes part (a reproducible run depends on that). The
        choice is seeded by (seed, round, attempt).
        """
        cfg = self._config
        needed = max(cfg.min_fit_clients, cfg.min_clients if round_number == 1 else 0)
        announced = -1  # the population size last logged: one line whenever it changes
        with self.cond:
            while not stop.is_set():
                if cfg.below_quorum == "wait":
                    population = sorted(self.roster.known)
                else:
                    population = self.roster.alive(time.monotonic())
                if len(population) >= needed:
                    others = [c for c in population if c not in avoid]
                    if len(others) >= cfg.min_fit_clients:
                        population = others
                    count = max(cfg.min_fit_clients, math.ceil(cfg.fraction_fit * len(population)))
                    rng = random.Random(f"{cfg.seed}:{round_number}:{attempt}")
                    return sorted(rng.sample(population, min(count, len(population))))
                if len(population) != announced:
                    # Only when it has to wait: between two rounds the run stays "running".
                    self.status.waiting_for_clients(round_number, needed)
                    log.info(
                        "round %d: waiting for %d more client(s) (%d of %d connected)",
                        round_number,
                        needed - len(population),
                        len(population),
                        needed,
                    )
                    announced = len(population)
                # Every join notifies the condition: count again at most 4 times a second, not
                # once per join (10,000 joins each sorting every session under the lock).
                recount = time.monotonic() + 0.25
                while not stop.is_set() and (left := recount - time.monotonic()) > 0:
                    self.cond.wait(left)
        return None

    def run_phase(self, phase: Phase, timeout: float, stop: threading.Event) -> Phase | None:
        """Open `phase`, wake its participants and wait until it can close; None when `stop`
        was set (the caller discards what the phase collected)."""
        deadline = time.monotonic() + timeout
        if self.client_rows is not None:
            self.client_rows.opened(phase)
        with self.cond:
            self.phase = phase
            self.roster.wake(phase.participants, time.monotonic())
            self.status.phase_opened(
                phase.kind.value, phase.round, timeout, phase.quorum, phase.participants
            )
            self.cond.notify_all()
            next_check = 0.0
            while not stop.is_set() and not phase.done():
                # Every result wakes this loop; the deadline and who is gone are looked at a
                # few times a second, not once per result (O(missing) each: quadratic in a
                # round of thousands).
                now = time.monotonic()
                if now >= next_check:
                    if self._can_close(phase, deadline, now):
                        break
                    next_check = now + CLOSE_CHECK_SECONDS
                self.cond.wait(next_check - now)
            # An upload that is being validated finishes first; none starts once it closed.
            while phase.validating:
                self.cond.wait(0.5)
            phase.open = False
            self.phase = None
            self.status.phase_closed()
        if stop.is_set():
            return None
        for identity, reason in phase.rejected.items():
            log.warning(
                "round %d: rejected %s from %s: %s", phase.round, phase.kind.value, identity, reason
            )
        return phase

    def _can_close(self, phase: Phase, deadline: float, now: float) -> bool:
        """Whether a phase that still misses answers has all it will get (called with the
        lock held): the deadline passed, or everyone still missing is gone (silent past the
        liveness timeout, no upload in flight). Under `below_quorum = "wait"` a training phase
        short of its quorum stays open regardless.
        """
        quorum_met = self._config.below_quorum == "retry" or len(phase.delivered) >= phase.quorum
        missing = sorted(phase.participants - phase.finished)
        if now >= deadline:
            if quorum_met:
                log.warning(
                    "round %d %s: deadline passed; no result from %s",
                    phase.round,
                    phase.kind.value,
                    names(missing),
                )
                return True
            if not phase.overdue_logged:
                log.warning(
                    "round %d %s: deadline passed with %d of %d results needed; waiting for %s",
                    phase.round,
                    phase.kind.value,
                    len(phase.delivered),
                    phase.quorum,
                    names(missing),
                )
                phase.overdue_logged = True
            return False
        # Only the missing are checked: O(missing) per result, not O(all).
        gone = [i for i in missing if i not in phase.submitted and not self.roster.is_alive(i, now)]
        if quorum_met and len(gone) == len(missing):
            log.warning(
                "round %d %s: closing early, no sign of life from %s",
                phase.round,
                phase.kind.value,
                names(gone),
            )
            return True
        return False

    def take_byte_counts(self) -> tuple[int, int]:
        """Bytes sent and received since the last call (one round's traffic)."""
        with self.cond:
            counts = (self._bytes_down, self._bytes_up)
            self._bytes_down = self._bytes_up = 0
            return counts

    def request_stop(self) -> None:
        """The run is over: every client that pulls is told to stop."""
        with self.cond:
            self._stopping = True
            self.roster.wake(now=time.monotonic())
            self.cond.notify_all()

    def shut_down(self) -> None:
        """This process is going away without finishing the run: clients retry until it is
        back (they are not told the run is over)."""
        with self.cond:
            self._shutting_down = True
            self.roster.wake(now=time.monotonic())
            self.cond.notify_all()

    def wait_for_stop_delivery(
        self, grace_seconds: float, stop: threading.Event | None = None
    ) -> None:
        """Keep telling clients the run is finished (at Join and PullTask) until each one it
        waits for has been told, `grace_seconds` pass, or `stop` is set. It waits for the live
        clients and for every known client this process has not heard from (restored from the
        checkpoint): a coordinator started again on a finished run stays up until the clients
        of that run, started again with it, have learned that it is over and can exit 0."""
        deadline = time.monotonic() + grace_seconds
        with self.cond:
            while self._stopping and self._not_told_finished():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (stop is not None and stop.is_set()):
                    return
                self.cond.wait(min(remaining, 0.5))

    def _not_told_finished(self) -> set[str]:
        waiting = set(self.roster.alive(time.monotonic()))
        if not self._config.insecure:  # insecure identities are new on every connection
            waiting |= self.roster.known - self.roster.joined()
        return waiting - self._told_to_stop

    def _silent_but_alive(self) -> set[str]:
        with self.cond:
            return self.roster.silent_but_alive()

    def alive_clients(self) -> list[str]:
        with self.cond:
            return self.roster.alive(time.monotonic())

    def known_clients(self) -> tuple[str, ...]:
        with self.cond:
            return tuple(sorted(self.roster.known))


def names(identities: list[str], shown: int = 10) -> str:
    """Identities for a log line: the first `shown`, then how many more (a round of 10,000
    clients must not write 100 KB lines)."""
    more = len(identities) - shown
    return ", ".join(identities[:shown]) + (f" and {more} more" if more > 0 else "")
