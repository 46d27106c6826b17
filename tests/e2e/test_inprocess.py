"""The round engine driven without a network: real client code (FederationClient, the digits
task) talks to the coordinator's real services (servicer, access policy, limits, engine)
through an in-process channel. The seam simulation builds on (server/inprocess.py)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.client.app import FederationClient
from fedlink.client.config import ClientConfig
from fedlink.common.tasks import load_task
from fedlink.server.inprocess import InProcessRpcError, InProcessServices
from fedlink.server.phases import RoundRecord, RunSummary
from fedlink.server.rounds import RoundEngine
from fedlink.server.service import FederationServicer, add_federation_service
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

SITES = ("site-a", "site-b")


Services = tuple[RoundEngine, InProcessServices, list[RoundRecord], "SlowUploads"]
HEARTBEAT_SECONDS = 0.2
UPLOAD_SECONDS = 1.0


class SlowUploads(FederationServicer):
    """The real servicer, with every upload held a second first (as a busy coordinator would)
    and the time of every heartbeat and upload recorded."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.uploads: list[tuple[float, float]] = []
        self.heartbeats: list[float] = []
        self.spools: Path | None = None  # when set: what the clients' spool dirs hold, per upload
        self.spool_files: list[set[tuple[str, str, int]]] = []

    async def PushResult(self, request_iterator: Any, context: Any) -> pb.PushResultReply:
        started = time.monotonic()
        if self.spools is not None:
            self.spool_files.append(
                {(p.parent.name, p.name, p.stat().st_ino) for p in self.spools.glob("*/*")}
            )
        await asyncio.sleep(UPLOAD_SECONDS)
        try:
            return await super().PushResult(request_iterator, context)
        finally:
            self.uploads.append((started, time.monotonic()))

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatReply:
        self.heartbeats.append(time.monotonic())
        return await super().Heartbeat(request, context)


@pytest.fixture
def services(pki: Any, tmp_path: Path) -> Iterator[Services]:
    config = pki.server_config(
        tmp_path,
        task="digits",
        num_rounds=2,
        min_clients=2,
        min_fit_clients=2,
        evaluate_every=1,
        heartbeat_interval_seconds=HEARTBEAT_SECONDS,
        liveness_timeout_seconds=2 * UPLOAD_SECONDS,
    )
    torch.manual_seed(config.seed)
    records: list[RoundRecord] = []
    engine = RoundEngine(
        config, load_task("digits").build_model().state_dict(), on_round=records.append
    )
    work = ThreadPoolExecutor(2)
    servicer = SlowUploads(engine, config, "in-process", work)
    in_process = InProcessServices(functools.partial(add_federation_service, servicer))
    try:
        yield engine, in_process, records, servicer
    finally:
        engine.request_stop()
        in_process.close()
        work.shutdown()


def test_a_federation_runs_in_process_through_the_real_services_and_client_code(
    pki: Any, tmp_path: Path, services: Services
) -> None:
    engine, in_process, records, servicer = services
    summary: dict[str, RunSummary] = {}
    runner = threading.Thread(target=lambda: summary.update(run=engine.run(threading.Event())))
    runner.start()
    codes: dict[str, int] = {}
    threads = []
    servicer.spools = tmp_path / "spools"
    for index, name in enumerate(SITES):
        (servicer.spools / name).mkdir(parents=True)
        cert, key, ca = pki.client(name)
        config = ClientConfig(
            server="in-process:0",
            cert=cert,
            key=key,
            ca=ca,
            task="digits",
            num_partitions=len(SITES),
            partition_index=index,
            threads=1,
            spool_dir=servicer.spools / name,
        )
        client = FederationClient(config, channel=in_process.channel(cert.read_bytes(), name))
        thread = threading.Thread(target=lambda n=name, c=client: codes.update({n: c.run()}))
        thread.start()
        threads.append(thread)
    runner.join(120)
    for thread in threads:
        thread.join(60)
    assert not runner.is_alive() and summary["run"].completed
    assert codes == dict.fromkeys(SITES, 0)  # both were told STOP after round 2
    assert [r.clients_accepted for r in records] == [2, 2]
    assert all(r.federated_accuracy is not None for r in records)
    assert records[-1].federated_accuracy > 0.5
    # An upload in progress shows the client is alive: no heartbeats while it lasts (a busy
    # coordinator would otherwise get heartbeats it cannot take up either).
    assert len(servicer.uploads) >= 8  # 2 clients x 2 rounds x (train, evaluate)
    during = [
        beat
        for beat in servicer.heartbeats
        for started, ended in servicer.uploads
        if started + HEARTBEAT_SECONDS + 0.1 < beat < ended
    ]
    assert not during, f"{len(during)} heartbeats during uploads"
    # Each client writes every global model straight into its model (client/download.py): no
    # spool file is ever made for a download, and an update goes out with no file at all.
    assert len(servicer.spool_files) == len(servicer.uploads)
    assert set().union(*servicer.spool_files) == set()
    assert not list(servicer.spools.glob("*/*"))


def test_the_in_process_channel_checks_certificates_like_mutual_tls(
    pki: Any, services: Services
) -> None:
    _, in_process, _, _ = services
    stub = pb_grpc.FederationStub(in_process.channel(b"not a certificate", "stranger"))
    with pytest.raises(InProcessRpcError) as refused:
        stub.Join(pb.JoinRequest(), timeout=10)
    assert refused.value.code().name == "UNAUTHENTICATED"
    cert, _, _ = pki.client("site-a")
    reply, call = pb_grpc.FederationStub(in_process.channel(cert.read_bytes(), "a")).Join.with_call(
        pb.JoinRequest(), timeout=10
    )
    assert reply.identity == "site-a"  # from the certificate, as over mTLS
    assert dict(call.trailing_metadata())["fedlink-session"]
