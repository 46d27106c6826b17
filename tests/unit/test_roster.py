"""The roster: who joined, who is alive, and which waiting polls a change wakes."""

from __future__ import annotations

from fedlink.server.roster import Roster


def test_joined_clients_are_alive_within_the_window_and_known_until_they_leave() -> None:
    roster = Roster(liveness_timeout=30.0)
    assert roster.join("a", now=0.0) and not roster.join("a", now=1.0)  # a second Join: not new
    assert roster.join("b", now=0.0)
    assert roster.seen("b", now=20.0) and not roster.seen("stranger", now=20.0)
    assert roster.alive(now=30.5) == ["a", "b"]
    assert roster.alive(now=45.0) == ["b"]
    assert roster.leave("a") and not roster.leave("a")
    assert roster.known == {"b"} and roster.joined() == {"b"} and roster.connected == 1


def test_a_waiting_poll_keeps_its_client_alive_and_is_woken_once() -> None:
    roster = Roster(liveness_timeout=30.0)
    roster.join("a", now=0.0)
    roster.join("b", now=0.0)
    woken: list[str] = []
    roster.add_waiter("a", lambda: woken.append("a"))
    roster.add_waiter("b", lambda: woken.append("b"))
    assert roster.alive(now=100.0) == ["a", "b"]  # no heartbeats while polling
    roster.wake(["a"])
    assert woken == ["a"]
    assert roster.alive(now=100.0) == ["b"]  # "a"'s poll ended: silence counts again
    roster.wake()
    roster.wake()
    assert woken == ["a", "b"]


def test_a_poll_that_ends_unwoken_is_forgotten() -> None:
    roster = Roster(liveness_timeout=30.0)
    roster.join("a", now=0.0)
    woken: list[str] = []

    def wake() -> None:
        woken.append("a")

    roster.add_waiter("a", wake)
    roster.remove_waiter("a", wake)
    roster.remove_waiter("a", wake)  # twice is harmless
    roster.wake()
    assert woken == [] and roster.alive(now=100.0) == []


def test_a_client_woken_from_its_poll_counts_as_seen_when_woken() -> None:
    # Its poll kept it alive until the wake; its next poll is not in yet when the phase that
    # woke it checks who is gone: it must not look silent for as long as it waited.
    roster = Roster(liveness_timeout=3.0)
    roster.join("a", now=0.0)
    roster.add_waiter("a", lambda: None)
    roster.wake(["a"], now=50.0)
    assert roster.alive(now=51.0) == ["a"]
