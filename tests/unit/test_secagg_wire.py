"""Secure aggregation's messages as they travel: a whole session in which every message between
the clients and the coordinator crosses as serialized bytes, and hostile bytes are refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedlink.client.secure import SECURE_STEPS as WIRE_STEPS
from fedlink.common import secagg_wire as wire
from fedlink.common.errors import SecAggError, SecAggRefused
from fedlink.common.fixedpoint import FixedPoint
from fedlink.common.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    UnmaskRequest,
)
from fedlink.server.phases import SECURE_STEPS as ENGINE_STEPS
from fedlink.v1 import federation_pb2 as pb


def _setup(n: int, length: int = 1000, threshold: int = 3) -> wire.SessionSetup:
    encoding = FixedPoint.for_sum(num_clients=n, value_bound=4.0)
    params = SecAggParams(session="task-1f2e", threshold=threshold, vector_length=length)
    return wire.SessionSetup(params, encoding, max_weight=100.0)


def test_session_over_serialized_messages_recovers_the_sum_despite_a_dropout() -> None:
    """Four clients, one killed after sending its masked input: the three others (>= t) still
    unmask the sum of all four, and no bytes the coordinator holds for a client are its vector."""
    n = 4
    header = pb.TaskHeader(secagg=wire.setup_to_proto(_setup(n)))
    # Clients learn the session only from the header's bytes.
    received = pb.TaskHeader.FromString(header.SerializeToString()).secagg
    setup = wire.setup_from_proto(received)
    ids = [f"site-{k}" for k in range(n)]
    clients = {i: SecAggClient(i, setup.params) for i in ids}
    server = SecAggServer(setup.params)
    rng = np.random.default_rng(7)
    values = {i: rng.uniform(-1, 1, setup.params.vector_length) for i in ids}
    vectors = {i: setup.encoding.encode(values[i]) for i in ids}

    for i in ids:
        server.add_keys(i, wire.keys_from_bytes(wire.keys_to_bytes(clients[i].advertise())))
    roster_bytes = wire.roster_to_bytes(server.close_advertisement())
    for i in ids:
        pushed = wire.shares_to_bytes(clients[i].share_keys(wire.roster_from_bytes(roster_bytes)))
        server.add_shares(i, wire.shares_from_bytes(pushed))
    server.close_sharing()
    stored: dict[str, bytes] = {}
    for i in ids:
        pulled, announced = wire.inbox_from_bytes(
            wire.shares_to_bytes(server.shares_for(i), server.contributors)
        )
        assert announced == server.contributors
        stored[i] = clients[i].masked_input(vectors[i], pulled, announced).tobytes()
        server.add_masked_input(i, setup.params.vector_from_bytes(stored[i]))
    survivors = wire.unmask_request_to_bytes(server.close_masked_inputs())
    digest = wire.setup_digest(setup)
    for i in ids:
        statement = clients[i].agree(wire.unmask_request_from_bytes(survivors), digest)
        signature = wire.view_signature_to_bytes(statement[-32:])  # no certificates here
        server.add_view_signature(i, wire.view_signature_from_bytes(signature))
    request_bytes = wire.unmask_request_to_bytes(server.close_agreement())
    assert set(wire.unmask_request_from_bytes(request_bytes).signatures) == set(ids)
    killed = ids[1]
    for i in ids:
        if i != killed:
            response = clients[i].unmask(wire.unmask_request_from_bytes(request_bytes))
            server.add_unmask_response(
                i, wire.unmask_response_from_bytes(wire.unmask_response_to_bytes(response))
            )
    total = server.result()

    expected = np.zeros(setup.params.vector_length, dtype=np.uint64)
    for vector in vectors.values():
        np.add(expected, vector, out=expected)
    assert np.array_equal(total, expected)  # the ring sum is exact
    decoded = setup.encoding.decode(total)
    bound = n * 2.0 ** -(setup.encoding.frac_bits + 1)
    assert np.abs(decoded - sum(values.values())).max() <= bound
    for i in ids:
        own = vectors[i]
        masked = np.frombuffer(stored[i], dtype=np.uint64)
        assert stored[i] != own.tobytes()
        assert np.mean(masked == own) < 0.01  # no coordinate left unmasked
        assert abs(np.corrcoef(masked.astype(np.float64), own.astype(np.float64))[0, 1]) < 0.2


def test_setup_round_trip_keeps_every_field() -> None:
    setup = wire.SessionSetup(
        SecAggParams(
            session="s",
            threshold=6,
            vector_length=17,
            ring_bits=32,
            neighbours=4,
            neighbour_threshold=3,
        ),
        FixedPoint.for_sum(num_clients=10, value_bound=2.5, ring_bits=32),
        max_weight=500.0,
        noise_std=0.25,
        clip_norm=1.5,
    )
    assert wire.setup_from_proto(wire.setup_to_proto(setup)) == setup


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("threshold", 1, "threshold must be >= 2"),
        ("ring_bits", 48, "ring_bits must be one of"),
        ("session", "", "session id must not be empty"),
        ("vector_length", 0, "vector length"),
        ("max_weight", float("nan"), "max_weight must be positive"),
        ("value_bound", -1.0, "value_bound must be positive"),
        ("noise_std", -0.1, "noise_std must be >= 0"),
        ("clip_norm", float("inf"), "clip_norm must be >= 0"),
        ("frac_bits", 60, "frac_bits=60 is out of range"),
        ("neighbours", 5, "neighbours must be 0 .the complete graph. or an even number"),
        ("neighbour_threshold", 2, "a neighbourhood threshold needs neighbours > 0"),
    ],
)
def test_a_hostile_setup_is_refused_with_a_clear_error(
    field: str, value: object, message: str
) -> None:
    proto = wire.setup_to_proto(_setup(4))
    setattr(proto, field, value)
    with pytest.raises(SecAggError, match=message):
        wire.setup_from_proto(proto)


def test_a_32_bit_setup_with_a_64_bit_encoding_is_refused() -> None:
    with pytest.raises(SecAggError, match="64-bit ring, the session a 32-bit one"):
        wire.SessionSetup(
            SecAggParams(session="s", threshold=2, vector_length=3, ring_bits=32),
            FixedPoint.for_sum(num_clients=3, value_bound=1.0, ring_bits=64),
            max_weight=1.0,
        )


@pytest.mark.parametrize(
    "parse",
    [
        wire.keys_from_bytes,
        wire.roster_from_bytes,
        wire.shares_from_bytes,
        wire.unmask_request_from_bytes,
        wire.unmask_response_from_bytes,
    ],
)
def test_malformed_bytes_raise_secagg_error(parse: object) -> None:
    assert callable(parse)
    with pytest.raises(SecAggError, match="malformed"):
        parse(b"\xff\xff\xff\xff")


def test_short_public_keys_and_shares_are_refused() -> None:
    short = pb.SecAggKeys(cipher_key=b"k" * 31, mask_key=b"m" * 32).SerializeToString()
    with pytest.raises(SecAggError, match="31 bytes"):
        wire.keys_from_bytes(short)
    roster = pb.SecAggRoster()
    roster.keys["a"].cipher_key = b"k" * 32
    with pytest.raises(SecAggError, match="0 bytes"):
        wire.roster_from_bytes(roster.SerializeToString())
    response = pb.SecAggUnmaskResponse(self_mask_shares={"a": b"\x00\x01"})
    with pytest.raises(SecAggError, match="secret share is"):
        wire.unmask_response_from_bytes(response.SerializeToString())


def test_a_request_naming_a_client_twice_is_refused() -> None:
    data = pb.SecAggUnmaskRequest(survivors=["a", "b", "a"]).SerializeToString()
    with pytest.raises(SecAggError, match="twice"):
        wire.unmask_request_from_bytes(data)


def test_a_request_for_both_shares_of_one_peer_is_refused_after_the_wire() -> None:
    """A client still refuses when the request arrives as bytes: a second request that lists an
    earlier survivor as dropped gets nothing."""
    setup = _setup(3, length=8, threshold=2)
    ids = ["a", "b", "c"]
    clients = {i: SecAggClient(i, setup.params) for i in ids}
    roster = {i: clients[i].advertise() for i in ids}
    outboxes = {i: clients[i].share_keys(roster) for i in ids}
    for i in ids:
        inbox = {sender: box[i] for sender, box in outboxes.items() if sender != i}
        clients[i].masked_input(np.zeros(8, dtype=np.uint64), inbox, ids)
    first = wire.unmask_request_to_bytes(UnmaskRequest(survivors=("a", "b", "c"), dropped=()))
    clients["a"].agree(wire.unmask_request_from_bytes(first), b"setup")
    clients["a"].unmask(wire.unmask_request_from_bytes(first))
    second = wire.unmask_request_to_bytes(UnmaskRequest(survivors=("a", "b"), dropped=("c",)))
    with pytest.raises(SecAggRefused):
        clients["a"].unmask(wire.unmask_request_from_bytes(second))


def test_payload_encodings_name_the_messages() -> None:
    names = {
        wire.KEYS_ENCODING,
        wire.ROSTER_ENCODING,
        wire.SHARES_ENCODING,
        wire.UNMASK_REQUEST_ENCODING,
        wire.UNMASK_RESPONSE_ENCODING,
        wire.ring_encoding(32),
        wire.ring_encoding(64),
    }
    assert len(names) == 7
    assert wire.ROSTER_ENCODING == "fedlink.v1.SecAggRoster"
    assert wire.ring_encoding(64) == "ring-u64le"


def test_every_secure_task_kind_of_either_side_names_a_step_with_its_encodings() -> None:
    # The coordinator's TaskKind and the wire's pb.TaskKind both spell a step SECAGG_<STEP>;
    # the step says what its task payload and its answer are encoded as.
    engine = [wire.SecAggStep[k.name.removeprefix("SECAGG_")] for k in ENGINE_STEPS]
    on_wire = [
        wire.SecAggStep[pb.TaskKind.Name(k).removeprefix("TASK_KIND_SECAGG_")] for k in WIRE_STEPS
    ]
    assert engine == on_wire == list(wire.SecAggStep)
    assert wire.SecAggStep.ADVERTISE.encodings(64) == ("safetensors", wire.KEYS_ENCODING)
    assert wire.SecAggStep.MASKED_INPUT.encodings(32) == (wire.SHARES_ENCODING, "ring-u32le")
