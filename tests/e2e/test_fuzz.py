"""Property-based fuzzing of a live coordinator over mTLS: malformed protobuf bytes, broken chunk
sequences, crafted safetensors headers, finite but extreme values and stale task ids. Every case is refused with a precise
status, the coordinator neither crashes nor hangs, and the global model never changes.

The cases come from `tests/fuzzing.py`; `benchmarks/fuzz.py` runs many more of them against a
`fedlink server` process.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuzzing import (
    FuzzClient,
    chunks_case,
    extreme_case,
    handshake_less_case,
    health_stream_case,
    honest_payload,
    outsider_case,
    protobuf_case,
    safetensors_case,
    stale_case,
    upload,
    would_accept,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlink.common.tensors import StateDict, open_state_file
from fedlink.server.phases import RunSummary
from fedlink.server.rounds import RoundEngine
from fedlink.server.transport import start_server

# Examples per property: 1,600 cases in all, about 25 s on 2 cores.
EXAMPLES = 250
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Each of these cases opens dozens of streams or connections: fewer of them cover the family.
FEWER = settings(FUZZ, max_examples=EXAMPLES // 5)


@dataclass
class Target:
    client: FuzzClient
    engine: RoundEngine
    stop: threading.Event
    thread: threading.Thread
    result: dict[str, RunSummary]


@pytest.fixture(scope="module")
def target(pki: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A coordinator that repeats one single-client round for as long as its only allowed client
    sends garbage (each failed attempt gets a new task id)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    initial: StateDict = {
        "layer.weight": torch.randn(8, 5, generator=generator),
        "layer.bias": torch.zeros(8),
        "norm.running_mean": torch.zeros(8, dtype=torch.float64),
        "norm.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
        "mask": torch.ones(3, dtype=torch.bool),
    }
    config = pki.server_config(
        tmp_path_factory.mktemp("fuzz") / uuid.uuid4().hex[:8],
        num_rounds=1,
        min_clients=1,
        min_fit_clients=1,
        min_results=1,
        evaluate_every=0,
        max_round_retries=10**9,
        round_timeout_seconds=120,
        max_num_examples=1000,
        allowed_clients=("fuzzer",),
        rate_limit_per_second=1e6,
        rate_limit_burst=10**6,
        chunk_size=4096,
    )
    engine = RoundEngine(config, initial)
    listening = start_server(config, engine)
    stop = threading.Event()
    result: dict[str, RunSummary] = {}
    thread = threading.Thread(target=lambda: result.update(summary=engine.run(stop)))
    thread.start()
    address = f"127.0.0.1:{listening.port}"
    client = FuzzClient(pki.channel(address, "fuzzer"), pki.channel(address, "outsider"), address)
    client.join()
    try:
        yield Target(client, engine, stop, thread, result)
    finally:
        print(f"\nfuzz cases run: {client.cases}")
        for (family, code), count in sorted(client.outcomes.items()):
            print(f"  {family:<12} {code:<20} {count}")
        stop.set()
        engine.request_stop()
        thread.join(30)
        listening.server.stop(0)


@FUZZ
@given(data=st.data())
def test_malformed_protobuf_messages_are_refused(target: Target, data: st.DataObject) -> None:
    protobuf_case(target.client, data)


@FUZZ
@given(data=st.data())
def test_broken_chunk_sequences_are_refused(target: Target, data: st.DataObject) -> None:
    chunks_case(target.client, data)


@FUZZ
@given(data=st.data())
def test_crafted_safetensors_headers_are_refused(target: Target, data: st.DataObject) -> None:
    safetensors_case(target.client, data)


@FUZZ
@given(data=st.data())
def test_finite_extreme_values_are_refused_before_they_reach_the_aggregate(
    target: Target, data: st.DataObject
) -> None:
    extreme_case(target.client, data)


@FUZZ
@given(data=st.data())
def test_stale_and_replayed_task_ids_are_refused_without_using_up_the_submission(
    target: Target, data: st.DataObject
) -> None:
    stale_case(target.client, data)


@FEWER
@given(data=st.data())
def test_health_watch_streams_are_refused_off_the_allow_list_and_bounded_per_client(
    target: Target, data: st.DataObject
) -> None:
    health_stream_case(target.client, data)


@FEWER
@given(data=st.data())
def test_connections_that_never_handshake_leave_the_coordinator_serving(
    target: Target, data: st.DataObject
) -> None:
    handshake_less_case(target.client, data)


@FUZZ
@given(data=st.data())
def test_malformed_requests_from_a_client_off_the_allow_list_are_refused(
    target: Target, data: st.DataObject
) -> None:
    outsider_case(target.client, data)


@pytest.mark.parametrize(
    "path", ["/fedlink.v1.Federation/Heartbeat", "/grpc.health.v1.Health/Check"]
)
def test_a_malformed_request_is_refused_by_the_coordinator_not_by_grpc(
    target: Target, path: str
) -> None:
    # gRPC's own "Exception deserializing request!" (INTERNAL) never frees the call's memory;
    # the coordinator parses requests in its handlers and answers INVALID_ARGUMENT instead.
    with pytest.raises(grpc.RpcError) as refused:
        target.client.channel.unary_unary(path)(b"\xff\xff\xff", timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "malformed request: not a valid protobuf message"


def test_zz_the_model_is_unchanged_and_an_honest_update_still_goes_through(
    target: Target,
) -> None:
    """Runs last: after all of the above the coordinator still serves the original model, and
    the harness is not vacuous, since the same client's well-formed upload is accepted."""
    client = target.client
    task = client.task()  # checks the model's digest once more
    assert client.cases >= 4 * EXAMPLES
    honest = honest_payload(client)
    assert would_accept(upload(task, honest), task, client.global_payload)
    accepted = client.send("honest", upload(task, honest), allowed=[grpc.StatusCode.OK])
    assert accepted == grpc.StatusCode.OK
    target.thread.join(60)
    summary = target.result["summary"]
    assert summary.completed and summary.last_record.clients_accepted == 1
    with open_state_file(Path(summary.final_model)) as final:
        expected = client.honest_state()
        assert final.keys() == expected.keys()
        for name, tensor in expected.items():
            assert (final[name] == tensor).all(), name
