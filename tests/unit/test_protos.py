"""Tests that the committed gRPC code is exactly what the .proto file generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import MethodDescriptor

from fedlink.v1 import federation_pb2, federation_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "protos" / "fedlink" / "v1"


def _generate_protos_script() -> ModuleType:
    path = ROOT / "scripts" / "generate_protos.py"
    spec = importlib.util.spec_from_file_location("generate_protos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("protos")
    paths: list[Path] = _generate_protos_script().generate(out)
    return {str(path.relative_to(out / "fedlink" / "v1")): path.read_bytes() for path in paths}


def test_generation_produces_message_stub_and_grpc_modules(generated: dict[str, bytes]) -> None:
    assert set(generated) == {
        f"{proto}{suffix}"
        for proto in ("admin", "federation")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    }


def test_committed_generated_files_are_exactly_the_generated_ones(
    generated: dict[str, bytes],
) -> None:
    committed = {path.name for path in COMMITTED.glob("*_pb2*.py*")}
    assert committed == set(generated), "run `python scripts/generate_protos.py` and commit"


def test_committed_generated_code_is_byte_identical_to_fresh_output(
    generated: dict[str, bytes],
) -> None:
    stale = [name for name, data in generated.items() if (COMMITTED / name).read_bytes() != data]
    assert stale == [], f"stale generated code {stale}: run `python scripts/generate_protos.py`"


def _method(name: str) -> MethodDescriptor:
    service = federation_pb2.DESCRIPTOR.services_by_name["Federation"]
    return service.methods_by_name[name]


def test_federation_service_declares_exactly_the_task_channel_rpcs() -> None:
    service = federation_pb2.DESCRIPTOR.services_by_name["Federation"]
    assert service.full_name == "fedlink.v1.Federation"
    assert set(service.methods_by_name) == {
        "Join",
        "PullTask",
        "PushResult",
        "Heartbeat",
        "Leave",
    }


@pytest.mark.parametrize(
    ("rpc", "request_type", "reply_type", "client_streaming", "server_streaming"),
    [
        ("Join", "JoinRequest", "JoinReply", False, False),
        ("PullTask", "PullTaskRequest", "TaskMessage", False, True),
        ("PushResult", "ResultMessage", "PushResultReply", True, False),
        ("Heartbeat", "HeartbeatRequest", "HeartbeatReply", False, False),
        ("Leave", "LeaveRequest", "LeaveReply", False, False),
    ],
)
def test_rpc_has_its_message_types_and_streaming_direction(
    rpc: str,
    request_type: str,
    reply_type: str,
    client_streaming: bool,
    server_streaming: bool,
) -> None:
    method = _method(rpc)
    assert method.input_type.full_name == f"fedlink.v1.{request_type}"
    assert method.output_type.full_name == f"fedlink.v1.{reply_type}"
    assert method.client_streaming is client_streaming
    assert method.server_streaming is server_streaming


def test_grpc_module_exposes_stub_and_servicer_for_every_rpc() -> None:
    servicer = federation_pb2_grpc.FederationServicer
    for rpc in ("Join", "PullTask", "PushResult", "Heartbeat"):
        assert callable(getattr(servicer, rpc))
    assert callable(federation_pb2_grpc.add_FederationServicer_to_server)
    assert hasattr(federation_pb2_grpc, "FederationStub")
