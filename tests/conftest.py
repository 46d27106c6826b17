"""Shared fixtures: a real federation PKI, an in-process coordinator on 127.0.0.1 with real mTLS,
and helpers that start real `fedlink` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedlink.common.pki import init_ca, issue_certificate
from fedlink.common.tensors import StateDict
from fedlink.server.config import ServerConfig
from fedlink.server.phases import RunSummary
from fedlink.server.rounds import RoundEngine
from fedlink.server.transport import LoopServer, start_server
from fedlink.v1 import federation_pb2_grpc as pb_grpc


@dataclass
class Pki:
    """A federation CA with a server bundle; client bundles are issued on demand."""

    root: Path
    ca_dir: Path
    server_dir: Path

    @property
    def ca_pem(self) -> Path:
        return self.ca_dir / "ca.pem"

    def client(self, name: str) -> tuple[Path, Path, Path]:
        bundle = self.root / name
        if not (bundle / f"{name}.pem").exists():
            issue_certificate(self.ca_dir, bundle, name, role="client")
        return bundle / f"{name}.pem", bundle / f"{name}.key", bundle / "ca.pem"

    def channel(self, address: str, name: str) -> grpc.Channel:
        cert, key, ca = self.client(name)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=cert.read_bytes(),
        )
        return grpc.secure_channel(
            address,
            credentials,
            options=[("grpc.max_send_message_length", 64 << 20)],
        )

    def server_config(self, tmp: Path, **overrides: Any) -> ServerConfig:
        base = ServerConfig(
            listen="127.0.0.1:0",
            cert=self.server_dir / "server.pem",
            key=self.server_dir / "server.key",
            ca=self.server_dir / "ca.pem",
            run_dir=tmp / "run",
            state_dir=tmp / "state",
        )
        return replace(base, **overrides)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ca")
    issue_certificate(
        root / "ca", root / "server", "server", role="server", hosts=["localhost", "127.0.0.1"]
    )
    return Pki(root=root, ca_dir=root / "ca", server_dir=root / "server")


@dataclass
class Coordinator:
    """A RoundEngine behind a real gRPC server with mTLS, running rounds in a thread."""

    engine: RoundEngine
    address: str
    stop: threading.Event
    thread: threading.Thread
    server: LoopServer
    result: dict[str, RunSummary] = field(default_factory=dict)

    def stub(self, pki: Pki, name: str) -> pb_grpc.FederationStub:
        return pb_grpc.FederationStub(pki.channel(self.address, name))

    def summary(self, timeout: float = 60.0) -> RunSummary:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the round loop did not finish"
        return self.result["summary"]


@pytest.fixture
def start_coordinator(pki: Pki, tmp_path: Path) -> Iterator[Any]:
    started: list[Coordinator] = []

    def start(initial_state: StateDict, **overrides: Any) -> Coordinator:
        config = pki.server_config(tmp_path / uuid.uuid4().hex[:8], **overrides)
        engine = RoundEngine(config, initial_state)
        listening = start_server(config, engine)
        server, port = listening.server, listening.port
        stop = threading.Event()
        result: dict[str, RunSummary] = {}
        thread = threading.Thread(target=lambda: result.update(summary=engine.run(stop)))
        thread.start()
        coordinator = Coordinator(engine, f"127.0.0.1:{port}", stop, thread, server, result)
        started.append(coordinator)
        return coordinator

    yield start
    for coordinator in started:
        coordinator.stop.set()
        coordinator.engine.request_stop()
        coordinator.thread.join(10)
        coordinator.server.stop(0)


def fedlink_process(
    arguments: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `python -m fedlink ...` as a real process, logging to `log`."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedlink", *arguments],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=log.parent,
        )


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before writing {path}")
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear within {timeout}s")


@pytest.fixture
def small_state() -> StateDict:
    """A tiny model state with the dtypes real state_dicts hold."""
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=generator),
        "layer.bias": torch.zeros(4),
        "norm.running_mean": torch.zeros(4),
        "norm.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
    }
