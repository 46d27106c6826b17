"""Secure aggregation through the round engine, without a network: real `RoundEngine`, real
client-side code (`client/secure.py`: encoding, keys, masking, unmasking) in threads, every
message crossing as the bytes the servicer would carry."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedlink.client.secure import SecureParticipant, encode_update, step_encodings
from fedlink.common.errors import ConfigError, SecAggRefused, UpdateRejected
from fedlink.common.fixedpoint import FixedPoint, UpdateLayout
from fedlink.common.pki import Credentials, load_credentials
from fedlink.common.secagg import KeyAdvertisement, SecAggParams, UnmaskRequest
from fedlink.common.secagg_wire import (
    SessionSetup,
    keys_from_bytes,
    roster_to_bytes,
    shares_from_bytes,
    shares_to_bytes,
    unmask_request_to_bytes,
    unmask_response_from_bytes,
)
from fedlink.common.tensors import StateDict, manifest_of, open_state_file
from fedlink.common.wire import PayloadInfo, payload_digest
from fedlink.server.config import ServerConfig
from fedlink.server.phases import SECURE_STEPS, ResultHeader, RunSummary, TaskKind, TaskOffer
from fedlink.server.rounds import RoundEngine
from fedlink.v1 import federation_pb2 as pb

_WIRE_KINDS = {
    TaskKind.SECAGG_ADVERTISE: pb.TASK_KIND_SECAGG_ADVERTISE,
    TaskKind.SECAGG_SHARE_KEYS: pb.TASK_KIND_SECAGG_SHARE_KEYS,
    TaskKind.SECAGG_MASKED_INPUT: pb.TASK_KIND_SECAGG_MASKED_INPUT,
    TaskKind.SECAGG_CONSISTENCY: pb.TASK_KIND_SECAGG_CONSISTENCY,
    TaskKind.SECAGG_UNMASK: pb.TASK_KIND_SECAGG_UNMASK,
}


def _model(seed: int, dtype: torch.dtype = torch.float64) -> StateDict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 50, generator=generator, dtype=dtype),
        "b": torch.randn(50, generator=generator, dtype=dtype),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def _config(tmp_path: Path, pki: Any = None, **overrides: Any) -> ServerConfig:
    """Insecure (no certificates: advertised keys unsigned), or with `pki`'s certificates."""
    settings: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "run_dir": tmp_path / "run",
        "num_rounds": 1,
        "min_clients": 3,
        "min_fit_clients": 3,
        "min_results": 1,
        "evaluate_every": 0,
        "heartbeat_interval_seconds": 0.1,
        "liveness_timeout_seconds": 0.5,
        "round_timeout_seconds": 30,
        "secagg_step_timeout_seconds": 30,
        "secure_aggregation": True,
    }
    settings.update(overrides)
    if pki is not None:
        config: ServerConfig = pki.server_config(tmp_path, **settings)
        return config
    return ServerConfig(insecure=True, **settings)


@dataclass
class Client:
    """One simulated client: trains to a fixed `update` and answers every secure step the way
    `fedlink client` does, until `stop_before` (a step it never answers: it went away)."""

    name: str
    update: StateDict
    num_examples: int
    stop_before: TaskKind | None = None
    credentials: Credentials | None = None  # signs its keys, checks its peers'
    refused_roster: list[str] = field(default_factory=list)
    decline: Callable[[TaskOffer], bool] = lambda offer: False
    # A hostile client: rewrites its answer (bytes, encoding) to a step before sending it.
    tamper: Callable[[TaskKind, bytes, str], tuple[bytes, str]] | None = None
    refusals: list[str] = field(default_factory=list)  # status codes of refused answers
    sent: list[bytes] = field(default_factory=list)
    sessions: set[str] = field(default_factory=set)
    setup: SessionSetup | None = None  # the last session's, as the coordinator announced it

    def run(self, engine: RoundEngine, done: threading.Event) -> None:
        participant = SecureParticipant(self.name, self.credentials)
        while not done.is_set():
            offer = engine.board.next_task(self.name, timeout=0.1)
            if offer.kind not in SECURE_STEPS:
                continue
            if offer.kind is self.stop_before:
                return  # silent from now on: the liveness timeout drops it
            assert offer.payload is not None and offer.secagg is not None
            setup = offer.secagg
            self.sessions.add(setup.params.session)
            self.setup = setup
            if self.decline(offer):
                _decline(engine, self.name, offer)
                continue
            wire_kind = _WIRE_KINDS[offer.kind]
            if offer.kind is TaskKind.SECAGG_ADVERTISE:
                with open_state_file(offer.payload.path) as global_state:
                    vector = encode_update(setup, self.update, global_state, self.num_examples)
                answer = participant.advertise(
                    setup, vector, offer.round, offer.payload.info.blake3
                )
            else:
                try:
                    answer = participant.respond(wire_kind, setup, offer.payload.path.read_bytes())
                except SecAggRefused as exc:
                    self.refused_roster.append(str(exc))
                    _decline(engine, self.name, offer)
                    continue
            _, encoding = step_encodings(wire_kind, setup)
            if self.tamper is not None:
                answer, encoding = self.tamper(offer.kind, answer, encoding)
            self.sent.append(answer)
            refusal = _deliver(engine, self.name, offer, answer, encoding)
            if refusal is not None:
                self.refusals.append(refusal.code)


def _header(offer: TaskOffer, payload: PayloadInfo | None) -> ResultHeader:
    return ResultHeader(offer.task_id, offer.round, 0, {}, payload)


def _deliver(
    engine: RoundEngine, name: str, offer: TaskOffer, data: bytes, encoding: str
) -> UpdateRejected | None:
    """Upload one answer as the servicer would; the refusal, if any (`fedlink client` logs it
    and pulls again)."""
    info = PayloadInfo(len(data), payload_digest(data), encoding)
    try:
        upload = engine.results.open_result(name, _header(offer, info))
    except UpdateRejected as exc:
        return exc
    try:
        upload.add_chunk(0, data)
        engine.results.finish_result(upload)
    except UpdateRejected as exc:
        engine.results.reject_result(upload, exc)
        return exc
    return None


def _decline(engine: RoundEngine, name: str, offer: TaskOffer) -> None:
    with pytest.raises(Exception, match="declined"):
        engine.results.open_result(name, _header(offer, None))


@dataclass
class Federation:
    engine: RoundEngine
    clients: list[Client]
    summary: RunSummary
    files_seen: dict[str, bytes]


def _federate(
    tmp_path: Path, initial: StateDict, clients: list[Client], pki: Any = None, **overrides: Any
) -> Federation:
    config = _config(tmp_path, pki, **overrides)
    engine = RoundEngine(config, initial)
    for client in clients:
        engine.board.join(client.name)
    done = threading.Event()
    files_seen: dict[str, bytes] = {}

    def watch() -> None:
        # Everything the coordinator keeps on disk while the round runs.
        while not done.is_set():
            # Files come and go while we look: a vanished one (or directory) is skipped.
            try:
                for path in config.state_dir.rglob("*"):
                    if path.is_file():
                        files_seen[str(path)] = path.read_bytes()
            except FileNotFoundError:
                pass
            time.sleep(0.005)

    threads = [threading.Thread(target=c.run, args=(engine, done), daemon=True) for c in clients]
    watcher = threading.Thread(target=watch, daemon=True)
    for thread in [*threads, watcher]:
        thread.start()
    try:
        summary = engine.run(threading.Event())
    finally:
        done.set()
        for thread in [*threads, watcher]:
            thread.join(10)
    return Federation(engine, clients, summary, files_seen)


def _fedavg(updates: list[tuple[float, StateDict]]) -> dict[str, torch.Tensor]:
    total = sum(weight for weight, _ in updates)
    return {
        name: sum(weight * state[name].double() for weight, state in updates) / total
        for name in ("w", "b")
    }


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    yield [Client(f"site-{i}", _model(i + 1), num_examples=10 * (i + 1)) for i in range(5)]


def test_the_secure_round_equals_weighted_fedavg_within_the_quantization_bound(
    tmp_path: Path, clients: list[Client]
) -> None:
    federation = _federate(tmp_path, _model(0), clients, min_fit_clients=5)
    assert federation.summary.completed
    record = federation.summary.last_record
    assert record is not None and record.clients_accepted == 5 and record.train_loss is None
    setup = clients[0].setup
    assert setup is not None and setup.params.threshold == 3  # a strict majority of 5
    assert setup.params.vector_length == UpdateLayout(manifest_of(_model(0))).length
    expected = _fedavg([(float(c.num_examples), c.update) for c in clients])
    with open_state_file(federation.summary.final_model) as model:
        weight_fraction = sum(c.num_examples for c in clients) / setup.max_weight
        bound = setup.encoding.average_error_bound(5, weight_fraction)
        for name in ("w", "b"):
            error = float((model[name].double() - expected[name]).abs().max())
            assert error <= bound, (name, error, bound)
        # Counters are not in the secure sum: they keep the global model's value.
        assert int(model["steps"]) == 0
    assert bound < 1e-5  # far below float32 resolution of the weights (~1e-7 relative)


def test_nothing_the_coordinator_receives_or_stores_reveals_a_clients_update(
    tmp_path: Path, clients: list[Client]
) -> None:
    federation = _federate(tmp_path, _model(0), clients, min_fit_clients=5)
    assert federation.summary.completed
    for client in clients:
        raw = b"".join(t.numpy().tobytes() for t in (client.update["w"], client.update["b"]))
        # What the coordinator received from this client, and every file it wrote during the
        # round, never contains a run of the update's bytes (as float64 or in the ring).
        assert client.setup is not None
        encoded = encode_update(client.setup, client.update, _model(0), client.num_examples)
        for secret in (raw, encoded.tobytes()):
            probes = [secret[i : i + 32] for i in range(0, len(secret) - 32, 997)]
            for blob in [*client.sent, *federation.files_seen.values()]:
                assert not any(probe in blob for probe in probes)
        masked_bytes = max(client.sent, key=len)
        masked = np.frombuffer(masked_bytes, dtype="<u8").view(np.int64).astype(np.float64)
        plain = encoded.view(np.int64).astype(np.float64)
        assert masked.shape == plain.shape
        assert abs(np.corrcoef(masked, plain)[0, 1]) < 0.1
    assert any("secagg-" in path for path in federation.files_seen), "the watcher saw the round"
    # Nothing of the round is left behind.
    leftovers = list((tmp_path / "state" / "incoming").iterdir())
    assert leftovers == []


def test_the_sum_is_recovered_when_clients_drop_at_every_step(tmp_path: Path) -> None:
    # 7 clients, threshold 4: one leaves before sharing keys, one before its masked input, one
    # after it (it never helps unmask). The sum is that of the 5 whose masked input arrived.
    steps = [
        TaskKind.SECAGG_SHARE_KEYS,
        TaskKind.SECAGG_MASKED_INPUT,
        TaskKind.SECAGG_UNMASK,
        None,
        None,
        None,
        None,
    ]
    clients = [
        Client(f"site-{i}", _model(i + 1), 10 * (i + 1), stop_before=step)
        for i, step in enumerate(steps)
    ]
    federation = _federate(tmp_path, _model(0), clients, min_fit_clients=7, min_results=1)
    assert federation.summary.completed
    record = federation.summary.last_record
    assert record is not None and record.clients_accepted == 5
    survivors = clients[2:]
    expected = _fedavg([(float(c.num_examples), c.update) for c in survivors])
    with open_state_file(federation.summary.final_model) as model:
        for name in ("w", "b"):
            error = float((model[name].double() - expected[name]).abs().max())
            assert error <= _bound(survivors), (name, error)


def test_below_the_threshold_the_attempt_fails_and_is_retried_with_a_fresh_session(
    tmp_path: Path,
) -> None:
    # 4 clients, threshold 3. Two decline the first session's key sharing: only 2 share, so
    # the sum of that attempt cannot be recovered; the retry runs a new session with new keys.
    first_session: list[str] = []

    def decline_first_share(offer: TaskOffer) -> bool:
        assert offer.secagg is not None
        if not first_session:
            first_session.append(offer.secagg.params.session)
        return (
            offer.kind is TaskKind.SECAGG_SHARE_KEYS
            and offer.secagg.params.session == first_session[0]
        )

    clients = [
        Client(f"site-{i}", _model(i + 1), 10, decline=decline_first_share if i < 2 else _never)
        for i in range(4)
    ]
    federation = _federate(
        tmp_path, _model(0), clients, min_fit_clients=4, min_results=1, max_round_retries=1
    )
    assert federation.summary.completed
    assert all(len(c.sessions) == 2 for c in clients)
    record = federation.summary.last_record
    assert record is not None and record.clients_accepted == 4
    assert record.rejected == {}  # the record is the successful attempt's
    expected = _fedavg([(10.0, c.update) for c in clients])
    with open_state_file(federation.summary.final_model) as model:
        assert float((model["w"].double() - expected["w"]).abs().max()) <= _bound(clients)


def _bound(survivors: list[Client]) -> float:
    """The documented bound on |secure average - weighted FedAvg| for these survivors."""
    setup = survivors[0].setup
    assert setup is not None
    weight_fraction = sum(min(c.num_examples, setup.max_weight) for c in survivors)
    return setup.encoding.average_error_bound(len(survivors), weight_fraction / setup.max_weight)


def _never(offer: TaskOffer) -> bool:
    return False


def test_the_run_fails_cleanly_when_no_attempt_reaches_the_threshold(tmp_path: Path) -> None:
    clients = [
        Client(f"site-{i}", _model(i + 1), 10, stop_before=TaskKind.SECAGG_SHARE_KEYS)
        if i < 2
        else Client(f"site-{i}", _model(i + 1), 10)
        for i in range(4)
    ]
    federation = _federate(
        tmp_path, _model(0), clients, min_fit_clients=4, min_results=1, max_round_retries=0
    )
    assert not federation.summary.completed
    assert federation.summary.rounds_completed == 0
    assert list((tmp_path / "state" / "incoming").iterdir()) == []


def test_secure_aggregation_with_dp_adds_split_noise_of_at_least_z_times_s_to_the_sum(
    tmp_path: Path,
) -> None:
    # Every client moves every coordinate by +1 (clipped to S); the mean change is S / sqrt(d)
    # per coordinate plus the noise of m = 5 client shares of std z S / sqrt(t) over m.
    d = 40 * 50 + 50
    clip, z = 2.0, 0.5
    initial = _model(0, torch.float32)
    clients = [
        Client(
            f"site-{i}",
            {k: (v + 1 if v.dtype.is_floating_point else v) for k, v in initial.items()},
            10,
        )
        for i in range(5)
    ]
    federation = _federate(
        tmp_path,
        initial,
        clients,
        min_fit_clients=5,
        min_results=1,
        dp_clip_norm=clip,
        dp_noise_multiplier=z,
    )
    assert federation.summary.completed
    record = federation.summary.last_record
    assert record is not None and record.epsilon is not None and math.isfinite(record.epsilon)
    with open_state_file(federation.summary.final_model) as model:
        change = torch.cat(
            [(model[k].double() - initial[k].double()).reshape(-1) for k in ("w", "b")]
        )
    threshold = 3  # a strict majority of 5
    expected_std = z * clip / math.sqrt(threshold) * math.sqrt(5) / 5
    assert abs(float(change.mean()) - clip / math.sqrt(d)) < 5 * expected_std / math.sqrt(d)
    assert 0.9 * expected_std < float(change.std()) < 1.1 * expected_std


def test_config_refuses_secure_aggregation_with_a_robust_rule_or_two_clients(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="robust rules need every individual update"):
        _config(tmp_path, aggregation="median")
    with pytest.raises(ConfigError, match="min_fit_clients >= 3"):
        _config(tmp_path, min_fit_clients=2, min_clients=2)
    with pytest.raises(ConfigError, match="secagg_ring_bits"):
        _config(tmp_path, secagg_ring_bits=16)
    with pytest.raises(ConfigError, match="secagg_value_bound"):
        _config(tmp_path, secagg_value_bound=float("nan"))
    for odd in (-2, 1, 3):
        with pytest.raises(ConfigError, match=r"secagg_neighbours must be 0 .* or an even number"):
            _config(tmp_path, secagg_neighbours=odd)


def test_a_secagg_plus_round_with_dropouts_equals_weighted_fedavg_of_the_survivors(
    tmp_path: Path,
) -> None:
    # 10 clients, 4 neighbours each (threshold 3 of a client and its neighbours), threshold 6
    # of the 10: one leaves before sharing keys, one after its masked input. Each client sends
    # share bundles to its 4 neighbours only, and the sum is that of the 9 masked inputs.
    steps: list[TaskKind | None] = [TaskKind.SECAGG_SHARE_KEYS, TaskKind.SECAGG_UNMASK]
    clients = [
        Client(f"site-{i}", _model(i + 1), 10 * (i + 1), stop_before=step)
        for i, step in enumerate([*steps, *[None] * 8])
    ]
    federation = _federate(
        tmp_path, _model(0), clients, min_fit_clients=10, min_results=1, secagg_neighbours=4
    )
    assert federation.summary.completed
    setup = clients[-1].setup
    assert setup is not None
    assert (setup.params.neighbours, setup.params.neighbour_threshold) == (4, 3)
    assert setup.params.threshold == 6
    for client in clients[1:]:
        # sent = [keys, share bundles, masked input, (unmask)]: bundles for 4 neighbours.
        assert len(shares_from_bytes(client.sent[1])) == 4
    record = federation.summary.last_record
    assert record is not None and record.clients_accepted == 9
    survivors = clients[1:]
    expected = _fedavg([(float(c.num_examples), c.update) for c in survivors])
    with open_state_file(federation.summary.final_model) as model:
        for name in ("w", "b"):
            error = float((model[name].double() - expected[name]).abs().max())
            assert error <= _bound(survivors), (name, error)


def _tampering(step: TaskKind, rewrite: Callable[[bytes, str], tuple[bytes, str]]) -> Any:
    def tamper(kind: TaskKind, answer: bytes, encoding: str) -> tuple[bytes, str]:
        return rewrite(answer, encoding) if kind is step else (answer, encoding)

    return tamper


@pytest.mark.parametrize(
    ("step", "rewrite", "code", "summed"),
    [
        (TaskKind.SECAGG_ADVERTISE, lambda a, e: (b"\xff\x01garbage", e), "INVALID_ARGUMENT", 4),
        (TaskKind.SECAGG_ADVERTISE, lambda a, e: (a, "safetensors"), "INVALID_ARGUMENT", 4),
        (TaskKind.SECAGG_SHARE_KEYS, lambda a, e: (a[:-1], e), "INVALID_ARGUMENT", 4),
        (TaskKind.SECAGG_MASKED_INPUT, lambda a, e: (a[:-8], e), "INVALID_ARGUMENT", 4),
        (TaskKind.SECAGG_MASKED_INPUT, lambda a, e: (a + bytes(8), e), "RESOURCE_EXHAUSTED", 4),
        # Well-formed but wrong shares: found and left out (5 answers >= threshold 3 + 2).
        (TaskKind.SECAGG_UNMASK, lambda a, e: (a[:-3] + b"xyz", e), None, 5),
    ],
    ids=[
        "garbage-keys",
        "wrong-encoding",
        "cut-shares",
        "short-vector",
        "long-vector",
        "bad-unmask",
    ],
)
def test_a_malformed_secure_message_is_refused_and_the_round_goes_on_without_it(
    tmp_path: Path,
    clients: list[Client],
    step: TaskKind,
    rewrite: Callable[[bytes, str], tuple[bytes, str]],
    code: str | None,
    summed: int,
) -> None:
    hostile = clients[4]
    hostile.tamper = _tampering(step, rewrite)
    federation = _federate(tmp_path, _model(0), clients, min_fit_clients=5)
    assert federation.summary.completed
    assert hostile.refusals == ([code] if code else [])
    record = federation.summary.last_record
    assert record is not None and record.clients_accepted == summed
    assert "site-4" in record.rejected
    included = clients[:summed]
    expected = _fedavg([(float(c.num_examples), c.update) for c in included])
    with open_state_file(federation.summary.final_model) as model:
        error = float((model["w"].double() - expected["w"]).abs().max())
        assert error <= _bound(included)


def test_a_client_refuses_an_unmasking_request_that_would_strip_a_peers_masks() -> None:
    # A curious coordinator lists b as both survived and dropped, asking for both kinds of share
    # of b (together they remove every mask from b's input). The client refuses (and `fedlink
    # client` declines the step); a later request in the session gets only its one answer.
    state = _model(1)
    setup = SessionSetup(
        SecAggParams("session", 2, UpdateLayout(manifest_of(state)).length),
        FixedPoint.for_sum(num_clients=3, value_bound=100.0),
        max_weight=100.0,
    )
    clients = {name: SecureParticipant(name, None) for name in ("a", "b", "c")}
    roster = roster_to_bytes(
        {
            name: keys_from_bytes(
                client.advertise(setup, encode_update(setup, state, state, 10), 1, b"model")
            )
            for name, client in clients.items()
        }
    )
    outboxes = {
        name: shares_from_bytes(client.respond(pb.TASK_KIND_SECAGG_SHARE_KEYS, setup, roster))
        for name, client in clients.items()
    }
    for name, client in clients.items():
        inbox = {sender: box[name] for sender, box in outboxes.items() if sender != name}
        client.respond(pb.TASK_KIND_SECAGG_MASKED_INPUT, setup, shares_to_bytes(inbox, clients))
    consistency, unmask = pb.TASK_KIND_SECAGG_CONSISTENCY, pb.TASK_KIND_SECAGG_UNMASK
    both = unmask_request_to_bytes(UnmaskRequest(survivors=("a", "b", "c"), dropped=("b",)))
    with pytest.raises(SecAggRefused, match="both survived and dropped"):
        clients["a"].respond(consistency, setup, both)
    honest = unmask_request_to_bytes(UnmaskRequest(survivors=("a", "b", "c"), dropped=()))
    clients["a"].respond(consistency, setup, honest)
    answer = unmask_response_from_bytes(clients["a"].respond(unmask, setup, honest))
    assert set(answer.self_mask_shares) == {"a", "b", "c"} and answer.mask_key_shares == {}
    # Asking again, now with b "dropped": the same answer, no share of b's mask key.
    later = unmask_request_to_bytes(UnmaskRequest(survivors=("a", "c"), dropped=("b",)))
    again = unmask_response_from_bytes(clients["a"].respond(unmask, setup, later))
    assert again == answer


def _signed(pki: Any, clients: list[Client]) -> list[Client]:
    for client in clients:
        client.credentials = load_credentials(*pki.client(client.name), role="client")
    return clients


def test_with_certificates_every_advertisement_is_signed_and_checked(
    pki: Any, tmp_path: Path, clients: list[Client]
) -> None:
    federation = _federate(tmp_path, _model(0), _signed(pki, clients), pki, min_fit_clients=5)
    assert federation.summary.completed
    record = federation.summary.last_record
    assert record is not None and record.clients_accepted == 5
    for client in clients:
        assert client.credentials is not None and not client.refused_roster
        keys = keys_from_bytes(client.sent[0])
        assert keys.certificate == client.credentials.cert_pem and keys.signature


def test_the_coordinator_refuses_keys_signed_with_another_clients_certificate(
    pki: Any, tmp_path: Path, clients: list[Client]
) -> None:
    # site-4 signs its advertisement with site-0's certificate and key: not its own identity.
    _signed(pki, clients)
    impostor = clients[4]
    impostor.credentials = clients[0].credentials
    federation = _federate(tmp_path, _model(0), clients, pki, min_fit_clients=5)
    assert federation.summary.completed
    assert impostor.refusals == ["INVALID_ARGUMENT"]
    record = federation.summary.last_record
    assert record is not None and record.clients_accepted == 4
    assert "names 'site-0'" in record.rejected["site-4"]


def test_a_client_refuses_a_roster_in_which_the_coordinator_replaced_a_peers_keys(
    pki: Any,
) -> None:
    # A man-in-the-middle coordinator hands out its own keys for b, hoping to read the shares
    # sealed for b. b's signature does not cover them, so a refuses the whole roster.
    state = _model(1)
    setup = SessionSetup(
        SecAggParams("session", 2, UpdateLayout(manifest_of(state)).length),
        FixedPoint.for_sum(num_clients=3, value_bound=100.0),
        max_weight=100.0,
    )
    clients = {
        name: SecureParticipant(name, load_credentials(*pki.client(name), role="client"))
        for name in ("a", "b", "c")
    }
    vector = encode_update(setup, state, state, 10)
    roster = {
        name: keys_from_bytes(client.advertise(setup, vector, 1, b"model"))
        for name, client in clients.items()
    }
    mallory = keys_from_bytes(SecureParticipant("b", None).advertise(setup, vector, 1, b"model"))
    share_keys = pb.TASK_KIND_SECAGG_SHARE_KEYS
    forged = dict(roster)
    forged["b"] = KeyAdvertisement(
        mallory.cipher_key, mallory.mask_key, roster["b"].certificate, roster["b"].signature
    )
    with pytest.raises(SecAggRefused, match="refusing the roster: the keys advertised for 'b'"):
        clients["a"].respond(share_keys, setup, roster_to_bytes(forged))
    unsigned = dict(roster)
    unsigned["c"] = KeyAdvertisement(roster["c"].cipher_key, roster["c"].mask_key)
    with pytest.raises(SecAggRefused, match="'c' are not signed"):
        clients["a"].respond(share_keys, setup, roster_to_bytes(unsigned))
    honest = clients["a"].respond(share_keys, setup, roster_to_bytes(roster))
    assert set(shares_from_bytes(honest)) == {"b", "c"}
