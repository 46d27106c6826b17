"""The upload spool: files rewritten in place across uploads, and never at the cost of room."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedlink.common.wire import PayloadFile, PayloadInfo, payload_digest
from fedlink.server import intake
from fedlink.server.intake import MAX_RECYCLED_FILES, ResultUpload, Spool
from fedlink.server.phases import Phase, ResultHeader, TaskKind


def _upload(spool: Spool, path: Path, data: bytes, model: PayloadFile) -> ResultUpload:
    info = PayloadInfo(len(data), payload_digest(data))
    header = ResultHeader("task", 1, 10, {}, info)
    phase = Phase(TaskKind.TRAIN, 1, "task", frozenset({"site"}), model)
    return ResultUpload(
        "site",
        header,
        phase,
        path,
        max_size=1 << 20,
        encoding=info.encoding,
        discard=spool.recycle,
    )


def _receive(upload: ResultUpload, data: bytes, chunk: int = 4096) -> None:
    for offset in range(0, len(data), chunk):
        upload.add_chunk(offset, data[offset : offset + chunk])
    upload.complete_payload()


@pytest.fixture
def model(tmp_path: Path) -> PayloadFile:
    path = tmp_path / "global.safetensors"
    path.write_bytes(b"model")
    return PayloadFile.seal(path)


def test_a_spool_file_done_with_is_rewritten_in_place_by_the_next_upload(
    tmp_path: Path, model: PayloadFile
) -> None:
    spool = Spool(tmp_path / "incoming")
    first = spool.take()
    large = os.urandom(50_000)
    upload = _upload(spool, first, large, model)
    _receive(upload, large)
    inode = first.stat().st_ino
    upload.close(keep=False)  # refused, say: the file is kept for the next upload
    assert first.exists()

    second = spool.take()
    assert second == first
    small = os.urandom(10_000)
    upload = _upload(spool, second, small, model)
    _receive(upload, small)  # checks size and digest of what arrived
    assert second.stat().st_ino == inode
    assert second.read_bytes() == small  # cut to the new payload: nothing of the old one left
    upload.close(keep=True)
    assert spool.take() != first  # kept (accepted): not handed out again


def test_at_most_so_many_spool_files_are_kept_and_all_go_when_the_run_ends(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "incoming")
    paths = [spool.take() for _ in range(MAX_RECYCLED_FILES + 5)]
    assert len(set(paths)) == len(paths)
    for path in paths:
        path.write_bytes(b"x")
        spool.recycle(path)
    assert len(list(spool.directory.iterdir())) == MAX_RECYCLED_FILES
    spool.stop_recycling()
    assert list(spool.directory.iterdir()) == []
    late = spool.take()
    late.write_bytes(b"x")
    spool.recycle(late)  # an upload that ends after the run: deleted, not kept
    assert not late.exists()


def test_recycled_files_give_way_when_an_upload_or_the_model_needs_the_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "incoming")
    kept = [spool.take() for _ in range(3)]
    for path, size in zip(kept, (3000, 1000, 2000), strict=True):
        path.write_bytes(b"x" * size)
        spool.recycle(path)
    # A disk with 5,000 bytes free besides the recycled files: free space grows as they go.
    usage = shutil.disk_usage(tmp_path)

    def disk_usage(_: Any) -> Any:
        held = sum(p.stat().st_size for p in kept if p.exists())
        return usage._replace(free=5000 + 6000 - held)

    monkeypatch.setattr(intake.shutil, "disk_usage", disk_usage)
    assert spool.reserve(4000, keep_free=1000) == 4000  # fits without touching them
    assert all(p.exists() for p in kept)
    spool.reserve(2000, keep_free=1000)  # needs 2,000 more: the largest recycled file goes
    assert [p.exists() for p in kept] == [False, True, True]
    spool.make_room(10_000)  # as before writing the next global model: 2,000 more
    assert [p.exists() for p in kept] == [False, True, False]
