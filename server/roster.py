"""Who takes part: the clients joined to this coordinator and when each was last seen, every
client that ever joined the run (restored from the checkpoint), and the long polls waiting for a
task. Not thread-safe on its own: the round engine calls it with its lock held."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

# Called, from any thread and with the engine's lock held, when a waiting poll may have a task:
# it must only hand the news on (set an event, schedule a callback), never block.
Wake = Callable[[], None]


class Roster:
    def __init__(self, liveness_timeout: float) -> None:
        self._window = liveness_timeout
        self._last_seen: dict[str, float] = {}  # joined to this coordinator
        # Everyone who ever joined this run: the population `below_quorum = "wait"` samples.
        self.known: set[str] = set()
        self._waiters: dict[str, list[Wake]] = {}  # polls waiting for a task, by identity
        self._downloading: Counter[str] = Counter()  # task payloads streaming to each client

    def join(self, identity: str, now: float) -> bool:
        """Record a Join; whether the identity was not joined before."""
        new = identity not in self._last_seen
        self._last_seen[identity] = now
        self.known.add(identity)
        return new

    def leave(self, identity: str) -> bool:
        """Forget a client that said it is going away (also from the known clients); whether
        it was joined."""
        if self._last_seen.pop(identity, None) is None:
            return False
        self.known.discard(identity)
        return True

    def seen(self, identity: str, now: float) -> bool:
        """Record a sign of life; False when the client has not joined this coordinator."""
        if identity not in self._last_seen:
            return False
        self._last_seen[identity] = now
        return True

    @property
    def connected(self) -> int:
        return len(self._last_seen)

    def joined(self) -> set[str]:
        return set(self._last_seen)

    def is_alive(self, identity: str, now: float) -> bool:
        """Seen within the liveness timeout, or waiting in a long poll or downloading its task
        now: clients send no heartbeats while a call of theirs is in progress (it ends when
        their connection does)."""
        last_seen = self._last_seen.get(identity)
        if last_seen is None:
            return False
        return (
            now - last_seen <= self._window
            or identity in self._waiters
            or identity in self._downloading
        )

    def silent_but_alive(self) -> set[str]:
        """Clients waiting in a long poll or downloading their task: alive, sending nothing."""
        return set(self._waiters) | set(self._downloading)

    def download_started(self, identity: str) -> None:
        self._downloading[identity] += 1

    def download_ended(self, identity: str, now: float) -> None:
        """A download ended (complete or not): the client was alive until now."""
        self._downloading[identity] -= 1
        if self._downloading[identity] <= 0:
            del self._downloading[identity]
        self.seen(identity, now)

    def alive(self, now: float) -> list[str]:
        return sorted(i for i in self._last_seen if self.is_alive(i, now))

    def add_waiter(self, identity: str, wake: Wake) -> None:
        self._waiters.setdefault(identity, []).append(wake)

    def remove_waiter(self, identity: str, wake: Wake) -> None:
        waiting = self._waiters.get(identity)
        if waiting is not None and wake in waiting:
            waiting.remove(wake)
            if not waiting:
                del self._waiters[identity]

    def wake(self, identities: Iterable[str] | None = None, now: float | None = None) -> None:
        """Call the waiters of `identities` (all when None), once each. With `now`, a client
        woken from its poll counts as seen then: it was alive waiting until this instant, and
        its next poll is not in yet (a phase checked right after opening must not find it
        silent for as long as it waited)."""
        chosen = list(self._waiters) if identities is None else list(identities)
        for identity in chosen:
            waiting = self._waiters.pop(identity, None)
            if waiting is None:
                continue
            if now is not None and identity in self._last_seen:
                self._last_seen[identity] = now
            for wake in waiting:
                wake()
