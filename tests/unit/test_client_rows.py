"""clients.jsonl: one row per client per round attempt, bounded, never under secure aggregation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fedlink.common.errors import ConfigError
from fedlink.common.wire import PayloadFile
from fedlink.server.client_rows import MAX_IDENTITY, ClientRows, ClientRowsFile
from fedlink.server.config import ServerConfig
from fedlink.server.phases import Phase, TaskKind


def _phase(tmp_path: Path, kind: TaskKind, round_number: int, task_id: str, *clients: str) -> Phase:
    model = tmp_path / "model"
    model.write_bytes(b"model")
    return Phase(kind, round_number, task_id, frozenset(clients), PayloadFile.seal(model))


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    settings: dict[str, Any] = {
        "insecure": True,
        "run_dir": tmp_path,
        "state_dir": tmp_path / "state",
        "min_fit_clients": 3,
    }
    return ServerConfig(**{**settings, **overrides})


def test_an_attempt_writes_a_row_per_sampled_and_per_other_connected_client(
    tmp_path: Path,
) -> None:
    rows = ClientRows(ClientRowsFile(tmp_path, 1 << 20), clock=lambda: 1000.0)
    train = _phase(tmp_path, TaskKind.TRAIN, 1, "t1", "a", "b")
    rows.opened(train)
    rows.transferred("t1", "a", down=100)
    rows.transferred("t1", "a", up=40)
    rows.accepted(train, "a", 12, {"loss": 0.5}, upload_seconds=0.25)
    rows.rejected(train, "b", "update has NaN\nin 'w'")
    evaluate = _phase(tmp_path, TaskKind.EVALUATE, 1, "e1", "a", "b")
    rows.opened(evaluate)
    rows.accepted(evaluate, "a", 30, {"loss": 0.4, "accuracy": 0.9}, upload_seconds=0.01)
    rows.close(completed=True, connected=["a", "b", "c"])

    a, b, c = _rows(tmp_path / "clients.jsonl")
    assert a == {
        "round": 1,
        "attempt": 0,
        "round_completed": True,
        "client": "a",
        "sampled": True,
        "bytes_down": 100,
        "bytes_up": 40,
        "time_unix": 1000.0,
        "train": {
            "result": "accepted",
            "num_examples": 12,
            "upload_seconds": 0.25,
            "metrics": {"loss": 0.5},
        },
        "evaluate": {
            "result": "accepted",
            "num_examples": 30,
            "upload_seconds": 0.01,
            "metrics": {"loss": 0.4, "accuracy": 0.9},
        },
    }
    # The reason stays one line; no evaluation result came from b before the phase closed.
    assert b["train"] == {"result": "rejected", "reason": "update has NaN\\nin 'w'"}
    assert b["evaluate"] == {"result": "missing"}
    # Connected but not sampled: a row without phases.
    assert c["sampled"] is False and "train" not in c and c["bytes_down"] == 0


def test_a_repeated_round_is_a_new_attempt_and_late_events_of_the_last_one_are_dropped(
    tmp_path: Path,
) -> None:
    rows = ClientRows(ClientRowsFile(tmp_path, 1 << 20))
    first = _phase(tmp_path, TaskKind.TRAIN, 3, "t1", "a")
    rows.opened(first)
    rows.close(completed=False, connected=["a"])
    second = _phase(tmp_path, TaskKind.TRAIN, 3, "t2", "a")
    rows.opened(second)
    # The first attempt's upload ends now: it belongs to no row of the second.
    rows.rejected(first, "a", "round 3 closed before the result arrived")
    rows.transferred("t1", "a", up=999)
    rows.close(completed=True, connected=["a"])
    rows.opened(_phase(tmp_path, TaskKind.TRAIN, 4, "t3", "a"))
    rows.close(completed=True, connected=[])

    written = _rows(tmp_path / "clients.jsonl")
    assert [(r["round"], r["attempt"], r["round_completed"]) for r in written] == [
        (3, 0, False),
        (3, 1, True),
        (4, 0, True),
    ]
    assert written[1]["train"] == {"result": "missing"} and written[1]["bytes_up"] == 0


def test_identities_are_escaped_and_cut_so_each_row_stays_one_plain_line(tmp_path: Path) -> None:
    rows = ClientRows(ClientRowsFile(tmp_path, 1 << 20))
    forged = "site\n\x1b[31m\u202e" + "x" * 5000
    rows.opened(_phase(tmp_path, TaskKind.TRAIN, 1, "t1", forged))
    rows.close(completed=True, connected=[])
    text = (tmp_path / "clients.jsonl").read_text()
    assert text.isascii() and text.count("\n") == 1
    (row,) = _rows(tmp_path / "clients.jsonl")
    assert row["client"].startswith("site\\n\\x1b[31m")
    assert len(row["client"]) <= MAX_IDENTITY + 20


def test_the_file_is_rotated_before_it_passes_its_cap(tmp_path: Path) -> None:
    file = ClientRowsFile(tmp_path, max_bytes=1000)
    for number in range(100):
        file.append([{"round": number, "padding": "x" * 50}])
    assert file.path.stat().st_size <= 1000
    assert file.rotated.stat().st_size <= 1000
    assert _rows(file.path)[-1]["round"] == 99  # the newest rows are kept
    assert _rows(file.rotated)[-1]["round"] == _rows(file.path)[0]["round"] - 1


def test_a_resumed_run_appends_after_a_row_cut_short_by_a_crash(tmp_path: Path) -> None:
    file = ClientRowsFile(tmp_path, 1 << 20)
    file.path.write_text('{"round": 1}\n{"round": 2, "cli')
    file.resume()
    file.append([{"round": 3}])
    lines = file.path.read_text().splitlines()
    assert json.loads(lines[0]) == {"round": 1} and json.loads(lines[-1]) == {"round": 3}


def test_no_rows_under_secure_aggregation_or_when_off_and_a_new_run_drops_old_ones(
    tmp_path: Path,
) -> None:
    stale = [tmp_path / "clients.jsonl", tmp_path / "clients.jsonl.1"]
    for path in stale:
        path.write_text('{"round": 9}\n')
    secure = _config(tmp_path, secure_aggregation=True)
    assert ClientRows.for_run(secure, resuming=False) is None
    assert not any(path.exists() for path in stale)  # an earlier run's rows
    assert ClientRows.for_run(_config(tmp_path, client_rows=False), resuming=False) is None
    assert ClientRows.for_run(_config(tmp_path), resuming=False) is not None


def test_a_file_that_cannot_be_written_costs_the_rows_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "clients.jsonl").mkdir()  # anything open() refuses
    rows = ClientRows(ClientRowsFile(tmp_path, 1 << 20))
    rows.opened(_phase(tmp_path, TaskKind.TRAIN, 1, "t1", "a"))
    with caplog.at_level(logging.WARNING):
        rows.close(completed=True, connected=[])
    assert "could not write round 1's per-client rows" in caplog.text


def test_client_rows_max_mb_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client_rows_max_mb must be at least 1"):
        _config(tmp_path, client_rows_max_mb=0)
