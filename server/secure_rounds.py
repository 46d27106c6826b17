"""The coordinator's side of secure aggregation (docs/privacy.md): what every client of an
attempt is told (session setup), what each step serves once it closes, each client's verified
message handed to the protocol state, and the new global model from the unmasked sum.
`train_securely` runs one attempt's five steps as phases on the board (server/board.py)."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import torch

from fedlink.common.dp import client_noise_std, secure_value_bound
from fedlink.common.errors import ConfigError, SecAggError, UpdateRejected
from fedlink.common.fixedpoint import FixedPoint, UpdateLayout
from fedlink.common.secagg import SecAggParams, SecAggServer, majority_of
from fedlink.common.secagg_auth import check_advertisement, check_view_signature
from fedlink.common.secagg_wire import (
    ROSTER_ENCODING,
    SHARES_ENCODING,
    UNMASK_REQUEST_ENCODING,
    SessionSetup,
    keys_from_bytes,
    roster_to_bytes,
    setup_digest,
    shares_from_bytes,
    shares_to_bytes,
    unmask_request_to_bytes,
    unmask_response_from_bytes,
    view_signature_from_bytes,
)
from fedlink.common.tensors import StateDict, open_state_file
from fedlink.common.wire import PayloadFile
from fedlink.server.board import PhaseBoard
from fedlink.server.config import ServerConfig
from fedlink.server.phases import Phase, SecureSession, TaskKind, Training

log = logging.getLogger(__name__)


def message_file(secure: SecureSession, name: str, data: bytes, encoding: str) -> PayloadFile:
    """A step message written once and streamed to every client that pulls it."""
    path = secure.directory / name
    path.write_bytes(data)
    return PayloadFile.seal(path, encoding)


def take_secure_message(
    kind: TaskKind, secure: SecureSession, identity: str, spool: Path, ca_pem: bytes | None
) -> None:
    """Hand one client's verified step message to the secure-aggregation state. A masked vector
    is folded into the running sum here; its spool file is deleted afterwards, so nothing any
    one client sent stays on disk. Advertised keys and survivors' views must carry the client's
    signature (unless `ca_pem` is None: --insecure development mode), so one client's bad
    signature is refused on arrival instead of failing the unmask step for everyone."""
    server = secure.server
    data = spool.read_bytes()
    try:
        if kind is TaskKind.SECAGG_ADVERTISE:
            advertisement = keys_from_bytes(data)
            if ca_pem is not None:
                check_advertisement(advertisement, secure.setup.params.session, identity, ca_pem)
            server.add_keys(identity, advertisement)
        elif kind is TaskKind.SECAGG_SHARE_KEYS:
            server.add_shares(identity, shares_from_bytes(data))
        elif kind is TaskKind.SECAGG_MASKED_INPUT:
            server.add_masked_input(identity, secure.setup.params.vector_from_bytes(data))
        elif kind is TaskKind.SECAGG_CONSISTENCY:
            signature = view_signature_from_bytes(data)
            if ca_pem is not None:
                statement = server.view_statement(setup_digest(secure.setup))
                check_view_signature(
                    signature, statement, identity, server.roster[identity], ca_pem
                )
            server.add_view_signature(identity, signature)
        else:
            server.add_unmask_response(identity, unmask_response_from_bytes(data))
    except SecAggError as exc:
        raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None


def session_setup(
    config: ServerConfig, layout: UpdateLayout, session: str, threshold: int, num_clients: int
) -> SessionSetup:
    """What every client of this attempt is told: the ring, the encoding, the weight cap and,
    with DP, the clip norm and each client's share of the noise."""
    cfg = config
    dimension = layout.length
    if cfg.dp_clip_norm is not None:
        # Split-noise DP-FedAvg: each client adds N(0, (z S)^2 / t) to its clipped change with
        # weight 1, so every sum of >= t of them carries at least the noise z S.
        noise_std = client_noise_std(cfg.dp_noise_multiplier, cfg.dp_clip_norm, threshold)
        bound = max(1.0, secure_value_bound(cfg.dp_clip_norm, noise_std, dimension))
        max_weight, clip_norm = 1.0, cfg.dp_clip_norm
    else:
        noise_std, clip_norm, bound = 0.0, 0.0, cfg.secagg_value_bound
        max_weight = cfg.secagg_max_weight or float(cfg.max_num_examples)
    try:
        encoding = FixedPoint.for_sum(
            num_clients=num_clients, value_bound=bound, ring_bits=cfg.secagg_ring_bits
        )
    except ValueError as exc:
        raise ConfigError(f"secure aggregation: {exc}") from None
    # SecAgg+: the smallest neighbourhood threshold clients accept, a strict majority of a
    # client and its k neighbours, so a client's secrets survive the most dropouts.
    k = cfg.secagg_neighbours
    params = SecAggParams(
        session,
        threshold,
        dimension,
        cfg.secagg_ring_bits,
        neighbours=k,
        neighbour_threshold=majority_of(k) if k else 0,
    )
    return SessionSetup(params, encoding, max_weight, noise_std, clip_norm)


def close_secure_step(
    kind: TaskKind, secure: SecureSession, delivered: frozenset[str], global_file: PayloadFile
) -> dict[str, Any]:
    """End a step in the secure-aggregation state; what the next step's phase serves."""
    server = secure.server
    if kind is TaskKind.SECAGG_ADVERTISE:
        roster = server.close_advertisement()
        return {"payload": message_file(secure, "roster", roster_to_bytes(roster), ROSTER_ENCODING)}
    if kind is TaskKind.SECAGG_SHARE_KEYS:
        server.close_sharing()
        inboxes = {
            identity: message_file(
                secure,
                f"inbox-{index}",
                shares_to_bytes(server.shares_for(identity), server.contributors),
                SHARES_ENCODING,
            )
            for index, identity in enumerate(sorted(delivered))
        }
        # The payload is never served (everyone has an inbox); the phase needs one.
        return {"inboxes": inboxes, "payload": global_file}
    if kind is TaskKind.SECAGG_MASKED_INPUT:
        request = server.close_masked_inputs()
        payload = message_file(
            secure, "survivors", unmask_request_to_bytes(request), UNMASK_REQUEST_ENCODING
        )
        return {"payload": payload}
    if kind is TaskKind.SECAGG_CONSISTENCY:
        request = server.close_agreement()
        payload = message_file(
            secure, "unmask", unmask_request_to_bytes(request), UNMASK_REQUEST_ENCODING
        )
        return {"payload": payload}
    return {}


def secure_average(
    total: Any, setup: SessionSetup, layout: UpdateLayout, global_path: Path
) -> StateDict:
    """The new global model from the unmasked ring sum.

    Without DP the clients encoded (w / W) * model, so the sum divided by its weight slot is
    weighted FedAvg. With DP they encoded their clipped, noised change with weight 1, so the
    same division gives the mean change, added to the current global model. Non-floating
    tensors (counters) are not part of the secure sum and keep the global model's values.
    """
    averaged = layout.average(setup.encoding.decode(total))
    state: StateDict = {}
    with open_state_file(global_path) as global_state:
        for name, tensor in global_state.items():
            if name not in averaged:
                state[name] = tensor.clone()
            elif setup.clip_norm > 0:
                change = averaged[name].to(torch.float64)
                state[name] = (tensor.to(torch.float64) + change).to(tensor.dtype)
            else:
                state[name] = averaged[name]
    return state


def train_securely(
    board: PhaseBoard,
    config: ServerConfig,
    layout: UpdateLayout,
    spool: Path,
    global_file: PayloadFile,
    round_number: int,
    sampled: list[str],
    stop: threading.Event,
) -> Training | None:
    """One attempt at a round under secure aggregation: five phases, each with the clients
    that completed the previous one, then the unmasked sum decoded into the new model. None
    when `stop` was set.

    The threshold t is a strict majority of the clients sampled (and at least min_results):
    the clients themselves refuse a smaller one, since two disjoint groups of t clients could
    then be told different stories about who dropped out.
    """
    threshold = max(2, config.min_results, len(sampled) // 2 + 1)
    session = uuid.uuid4().hex
    setup = session_setup(config, layout, session, threshold, len(sampled))
    directory = spool / f"secagg-{session}"
    directory.mkdir()
    secure = SecureSession(setup, SecAggServer(setup.params), directory)
    rejected: dict[str, str] = {}
    answered = frozenset(sampled)
    try:
        steps = (
            (TaskKind.SECAGG_ADVERTISE, config.round_timeout_seconds),
            (TaskKind.SECAGG_SHARE_KEYS, config.secagg_step_timeout_seconds),
            (TaskKind.SECAGG_MASKED_INPUT, config.secagg_step_timeout_seconds),
            (TaskKind.SECAGG_CONSISTENCY, config.secagg_step_timeout_seconds),
            (TaskKind.SECAGG_UNMASK, config.secagg_step_timeout_seconds),
        )
        details: dict[str, Any] = {"payload": global_file}
        for kind, timeout in steps:
            participants = sorted(answered)
            phase = board.run_phase(
                Phase(
                    kind=kind,
                    round=round_number,
                    # Each step its own task id: a late message of one step is never taken
                    # as the next step's.
                    task_id=session if kind is TaskKind.SECAGG_ADVERTISE else uuid.uuid4().hex,
                    participants=frozenset(participants),
                    quorum=threshold,
                    secure=secure,
                    **details,
                ),
                timeout,
                stop,
            )
            if phase is None:
                return None
            rejected.update(phase.rejected)
            answered = frozenset(phase.delivered)
            details = {
                "payload": global_file,
                **close_secure_step(kind, secure, answered, global_file),
            }
        survivors = len(participants)  # unmasking's: those whose masked input is summed
        total = secure.server.result()
        for culprit in secure.server.corrupt_responders:
            rejected[culprit] = "sent corrupted unmasking shares; unmasked without them"
            log.warning(
                "round %d: %s sent corrupted unmasking shares; the sum was unmasked with the "
                "other survivors' shares",
                round_number,
                culprit,
            )
    except SecAggError as exc:
        log.warning("round %d: secure aggregation failed: %s", round_number, exc)
        return Training(None, 0, answered, rejected, [])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    graph, k = secure.server.graph, setup.params.neighbours
    sparse = (
        f"; SecAgg+: {k} neighbours each, {graph.share_threshold} of a client's {k + 1} "
        "holders rebuild its secrets"
        if graph is not None and graph.sparse
        else ""
    )
    log.info(
        "round %d: secure aggregation recovered the sum of %d of %d clients (threshold %d%s)",
        round_number,
        survivors,
        len(sampled),
        threshold,
        sparse,
    )
    average = secure_average(total, setup, layout, global_file.path)
    return Training(average, survivors, answered, rejected, [])
