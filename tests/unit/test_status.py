"""RunStatus (what the engine reports for operators), RecentLogs and the excluded clients."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedlink.common.errors import AccessDenied, ConfigError, PKIError
from fedlink.server.exclusions import EXCLUSIONS_FILE, Exclusions
from fedlink.server.status import LOG_LINES, RecentLogs, RunStatus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_shows_its_round_deadline_quorum_and_participants() -> None:
    clock = Clock()
    status = RunStatus(num_rounds=5, liveness_timeout=30, clock=clock)
    status.waiting_for_clients(1, needed=2)
    assert status.snapshot()["state"] == "waiting for clients"
    assert status.snapshot()["clients_needed"] == 2
    for name in ("a", "b", "c"):
        status.client_joined(name)
    status.phase_opened("train", 1, timeout=60, quorum=2, participants=["a", "b"])
    status.count_bytes("a", down=100, up=40)
    status.result_accepted("a", 1, "train")
    status.result_rejected("b", 1, "train", "bad tensor\nforged line")
    snap = status.snapshot()
    assert (snap["state"], snap["round"], snap["phase"]) == ("running", 1, "train")
    assert (snap["deadline_unix"], snap["quorum"], snap["delivered"]) == (1060.0, 2, 1)
    clients = {c["identity"]: c for c in snap["clients"]}
    assert clients["a"]["sampled"] and clients["b"]["sampled"] and not clients["c"]["sampled"]
    assert (clients["a"]["bytes_down"], clients["a"]["bytes_up"]) == (100, 40)
    assert clients["a"]["last_result"] == "round 1 train: accepted"
    assert clients["b"]["last_error"] == "bad tensor\\nforged line"  # one line, escaped
    status.phase_closed()
    assert status.snapshot()["phase"] == "" and status.snapshot()["deadline_unix"] == 0.0
    # A new round starts every client's byte counts afresh (also after waiting for clients).
    status.waiting_for_clients(2, needed=1)
    status.phase_opened("train", 2, timeout=60, quorum=2, participants=["a"])
    assert status.snapshot()["clients"][0]["bytes_down"] == 0


def test_a_client_counts_as_connected_while_seen_within_the_liveness_timeout() -> None:
    clock = Clock()
    status = RunStatus(num_rounds=1, liveness_timeout=30, clock=clock)
    status.client_joined("a")
    clock.now += 31
    assert not status.snapshot()["clients"][0]["connected"]
    status.client_seen("a")
    assert status.snapshot()["clients"][0]["connected"]
    status.client_left("a", "shutting down")
    (client,) = status.snapshot()["clients"]
    assert not client["connected"] and client["last_error"] == "left: shutting down"
    status.excluded("a", "slow")
    assert status.snapshot()["clients"][0]["excluded"]


def test_a_silent_client_the_engine_knows_is_waiting_counts_as_connected() -> None:
    clock = Clock()
    status = RunStatus(num_rounds=1, liveness_timeout=30, clock=clock)
    status.client_joined("a")
    status.client_joined("b")
    status.count_as_alive(lambda: {"a"})  # in a long poll or a download: no heartbeats
    clock.now += 31
    connected = {c["identity"]: c["connected"] for c in status.snapshot()["clients"]}
    assert connected == {"a": True, "b": False}


def test_completed_rounds_are_kept_for_the_dashboard() -> None:
    status = RunStatus(num_rounds=3, liveness_timeout=30)
    status.round_completed({"round": 1, "test_accuracy": 0.5})
    status.round_completed({"round": 2, "test_accuracy": 0.6})
    assert status.snapshot()["completed_rounds"] == 2
    assert [r["round"] for r in status.rounds()] == [1, 2]


def test_recent_logs_keep_a_bounded_number_of_escaped_lines() -> None:
    logs = RecentLogs()
    logger = logging.getLogger("fedlink.test.status")
    logger.addHandler(logs)
    logger.propagate = False
    try:
        for i in range(LOG_LINES + 5):
            logger.warning("line %d\nINFO forged", i)
    finally:
        logger.removeHandler(logs)
    lines = logs.lines()
    assert len(lines) == LOG_LINES
    assert lines[-1]["message"] == f"line {LOG_LINES + 4}\\nINFO forged"
    assert lines[-1]["level"] == "WARNING" and lines[-1]["logger"] == "fedlink.test.status"
    assert len(logs.lines(3)) == 3


def test_an_exclusion_is_refused_and_survives_a_restart(tmp_path: Path) -> None:
    exclusions = Exclusions(tmp_path)
    assert exclusions.add("site-1", "sends garbage\nforged")
    assert not exclusions.add("site-1", "again")
    with pytest.raises(AccessDenied) as refused:
        exclusions.check("site-1")
    assert refused.value.code == "PERMISSION_DENIED"
    assert "excluded from this run" in str(refused.value) and "\\nforged" in str(refused.value)
    exclusions.check("site-2")
    assert "site-1" in Exclusions(tmp_path)  # a restarted coordinator reads it back
    with pytest.raises(PKIError):
        exclusions.add("../etc", "not a name")


def test_an_unreadable_exclusion_file_stops_the_coordinator(tmp_path: Path) -> None:
    (tmp_path / EXCLUSIONS_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="delete it to admit every client"):
        Exclusions(tmp_path)
    (tmp_path / EXCLUSIONS_FILE).write_text(json.dumps({"site-1": "no"}))
    with pytest.raises(ConfigError):
        Exclusions(tmp_path)
