"""This client's side of secure aggregation (docs/privacy.md), one session at a time.

The coordinator runs a secure round as four tasks that share one session (server/rounds.py).
The update is encoded into the ring right after training; the session's secrets (two X25519
private keys, the self-mask seed, the encoded update) live in this object only, and are
dropped as soon as a task for another session arrives.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlink.common.dp import add_gaussian_noise, clip_update
from fedlink.common.errors import SecAggError, SecAggRefused
from fedlink.common.fixedpoint import UpdateLayout, encode_weighted_update
from fedlink.common.pki import Credentials
from fedlink.common.secagg import KeyAdvertisement, RingVector, SecAggClient
from fedlink.common.secagg_auth import check_advertisement, sign_advertisement
from fedlink.common.secagg_wire import (
    SecAggStep,
    SessionSetup,
    keys_to_bytes,
    roster_from_bytes,
    shares_from_bytes,
    shares_to_bytes,
    unmask_request_from_bytes,
    unmask_response_to_bytes,
)
from fedlink.common.tensors import manifest_of
from fedlink.v1 import federation_pb2 as pb

SECURE_STEPS = (
    pb.TASK_KIND_SECAGG_ADVERTISE,
    pb.TASK_KIND_SECAGG_SHARE_KEYS,
    pb.TASK_KIND_SECAGG_MASKED_INPUT,
    pb.TASK_KIND_SECAGG_UNMASK,
)


def step_encodings(kind: pb.TaskKind, setup: SessionSetup) -> tuple[str, str]:
    """(what the task's payload must be, what the answer is) for one step."""
    step = SecAggStep[pb.TaskKind.Name(kind).removeprefix("TASK_KIND_SECAGG_")]
    return step.encodings(setup.params.ring_bits)


def encode_update(
    setup: SessionSetup,
    trained: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    num_examples: int,
) -> RingVector:
    """The ring vector this client contributes to the session's sum.

    Without DP: (w / W) * the trained model, w = num_examples capped at the weight cap W. With
    DP (the setup carries a clip norm): the change from `global_state` clipped to that norm,
    plus this client's share of the Gaussian noise, with weight 1 (`global_state` is read only
    then).
    """
    layout = UpdateLayout(manifest_of(trained))
    if layout.length != setup.params.vector_length:
        raise SecAggError(
            f"the session sums vectors of {setup.params.vector_length} entries, but this "
            f"client's model has {layout.length}"
        )
    try:
        if setup.clip_norm == 0:
            weight = min(float(num_examples), setup.max_weight)
            return encode_weighted_update(
                trained,
                weight,
                max_weight=setup.max_weight,
                layout=layout,
                encoding=setup.encoding,
            )
        change = {
            name: (tensor.double() - global_state[name].double()).to(tensor.dtype)
            for name, tensor in trained.items()
            if tensor.dtype.is_floating_point
        }
        clipped, _ = clip_update(change, setup.clip_norm)
        noisy = add_gaussian_noise(clipped, setup.noise_std) if setup.noise_std > 0 else clipped
        return encode_weighted_update(
            noisy, 1.0, max_weight=1.0, layout=layout, encoding=setup.encoding
        )
    except ValueError as exc:  # e.g. a weight beyond the federation's value bound
        raise SecAggError(f"cannot encode this client's update: {exc}") from None


class SecureParticipant:
    """Answers the four steps of the current session; a re-offered step (the upload of the
    answer broke off) gets the same answer again, never a second, different one."""

    def __init__(self, identity: str, credentials: Credentials | None) -> None:
        """`credentials` sign this client's keys and check its peers' (None: --insecure
        development mode, where keys are neither signed nor checked)."""
        self.identity = identity
        self._credentials = credentials
        self._setup: SessionSetup | None = None
        self._client: SecAggClient | None = None
        self._vector: RingVector | None = None
        self._answers: dict[pb.TaskKind, bytes] = {}

    def given_answer(self, kind: pb.TaskKind, setup: SessionSetup) -> bytes | None:
        """The answer already given to this step of this session, if any."""
        if self._setup is None or setup.params.session != self._setup.params.session:
            return None
        return self._answers.get(kind)

    def advertise(self, setup: SessionSetup, vector: RingVector) -> bytes:
        """Start a session with this client's encoded update: fresh keys, to advertise."""
        self._setup, self._vector, self._answers = setup, vector, {}
        self._client = SecAggClient(self.identity, setup.params)
        keys = self._client.advertise()
        if self._credentials is not None:
            keys = sign_advertisement(keys, setup.params.session, self.identity, self._credentials)
        return self._remember(pb.TASK_KIND_SECAGG_ADVERTISE, keys_to_bytes(keys))

    def respond(self, kind: pb.TaskKind, setup: SessionSetup, message: bytes) -> bytes:
        """Answer a later step (share keys, masked input, unmask) of the current session."""
        answer = self.given_answer(kind, setup)
        if answer is not None:
            return answer
        if self._client is None or self._setup is None or setup != self._setup:
            raise SecAggError(
                f"no keys for secure-aggregation session {setup.params.session[:8]} (this client "
                "restarted or missed its start, or the coordinator changed the session's settings)"
            )
        if kind == pb.TASK_KIND_SECAGG_SHARE_KEYS:
            roster = roster_from_bytes(message)
            self._check_roster(roster, setup.params.session)
            answer = shares_to_bytes(self._client.share_keys(roster))
        elif kind == pb.TASK_KIND_SECAGG_MASKED_INPUT:
            assert self._vector is not None
            masked = self._client.masked_input(self._vector, shares_from_bytes(message))
            answer, self._vector = masked.tobytes(), None
        else:
            request = unmask_request_from_bytes(message)
            answer = unmask_response_to_bytes(self._client.unmask(request))
        return self._remember(kind, answer)

    def _check_roster(self, roster: Mapping[str, KeyAdvertisement], session: str) -> None:
        """Every peer's keys must be signed by that peer's certificate: shares are sealed to
        these keys, so keys the coordinator substituted would hand it the shares."""
        if self._credentials is None:
            return
        for peer, advertisement in roster.items():
            if peer == self.identity:
                continue
            try:
                check_advertisement(advertisement, session, peer, self._credentials.ca_pem)
            except SecAggError as exc:
                raise SecAggRefused(f"refusing the roster: {exc}") from None

    def _remember(self, kind: pb.TaskKind, answer: bytes) -> bytes:
        self._answers[kind] = answer
        return answer
