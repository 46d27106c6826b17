"""This client's side of secure aggregation (docs/privacy.md), one session at a time.

The coordinator runs a secure round as five tasks that share one session (server/rounds.py).
The update is encoded into the ring right after training; the session's secrets (two X25519
private keys, the self-mask seed, the encoded update) live in this object only, and are
dropped as soon as a task for another session arrives.

The coordinator is not trusted to keep the promise of secure aggregation: the survivors sign
their view of the session and check each other's signatures before unmasking (common/secagg.py),
and the site's own `PrivacyFloor` bounds what any coordinator can ask of it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlink.common.dp import add_gaussian_noise, clip_update
from fedlink.common.errors import (
    BelowPrivacyFloor,
    ConfigError,
    SecAggError,
    SecAggRefused,
    StorageError,
)
from fedlink.common.fixedpoint import UpdateLayout, encode_weighted_update
from fedlink.common.pki import Credentials
from fedlink.common.secagg import KeyAdvertisement, RingVector, SecAggClient
from fedlink.common.secagg_auth import (
    check_advertisement,
    check_view_signatures,
    sign_advertisement,
    sign_view,
)
from fedlink.common.secagg_wire import (
    SecAggStep,
    SessionSetup,
    inbox_from_bytes,
    keys_to_bytes,
    roster_from_bytes,
    setup_digest,
    shares_to_bytes,
    unmask_request_from_bytes,
    unmask_response_to_bytes,
    view_signature_to_bytes,
)
from fedlink.common.storage import write_durably
from fedlink.common.tensors import manifest_of
from fedlink.v1 import federation_pb2 as pb

SECURE_STEPS = (
    pb.TASK_KIND_SECAGG_ADVERTISE,
    pb.TASK_KIND_SECAGG_SHARE_KEYS,
    pb.TASK_KIND_SECAGG_MASKED_INPUT,
    pb.TASK_KIND_SECAGG_CONSISTENCY,
    pb.TASK_KIND_SECAGG_UNMASK,
)


class SignedSessions:
    """How many secure-aggregation sessions of each round, and of each global model, this client
    signed the survivors of. The counts by global model are also kept in `path` when given (the
    client's state_dir), so a restarted client keeps counting: otherwise a coordinator could
    retry a round after each restart and subtract the sums. (Round numbers start again in every
    run, so they are counted in memory only; the same global model trained again with the same
    seed gives the same update, whichever run asks.) The file holds counts only, no keys or
    updates, for the newest models."""

    KEEP = 256  # entries kept: far more than the rounds a retry could still reach

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._counts: dict[str, int] = {}
        if path is not None and path.exists():
            self._counts = _read_counts(path)

    def spent(self, round_number: int, model_digest: bytes) -> int:
        return max(self._counts.get(key, 0) for key in _keys(round_number, model_digest))

    def record(self, round_number: int, model_digest: bytes) -> None:
        for key in _keys(round_number, model_digest):
            self._counts[key] = self._counts.pop(key, 0) + 1  # newest last
        while len(self._counts) > self.KEEP:
            del self._counts[next(iter(self._counts))]
        if self._path is not None:
            kept = {k: v for k, v in self._counts.items() if k.startswith("model:")}
            try:
                write_durably(self._path, json.dumps(kept).encode())
            except StorageError as exc:
                # Signing without a record would let a restart reset the count: refuse instead.
                raise SecAggRefused(f"cannot record this session before signing: {exc}") from None


def _keys(round_number: int, model_digest: bytes) -> tuple[str, str]:
    return f"round:{round_number}", f"model:{model_digest.hex()}"


def _read_counts(path: Path) -> dict[str, int]:
    try:
        counts = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); restore it or remove it") from None
    if not isinstance(counts, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in counts.items()
    ):
        raise ConfigError(
            f"{path} is not a fedlink record of signed sessions; restore it or remove it"
        )
    return counts


@dataclass(frozen=True)
class PrivacyFloor:
    """The least privacy this site accepts from any coordinator (the client's own config).

    0 means no floor for the first three. With any of them set the site also refuses plain
    (not securely aggregated) training, where the coordinator would read its update.
    `max_attempts_per_round` caps the sessions of one round (by round number and by global model
    with training seed, so renumbering a retry does not reset it) in which this client signed
    the survivor set: two sums that differ only in whether this client took part give its update
    away by subtraction. An attempt counts when the client signs, not when it sends its masked
    input: no honest holder releases shares before every survivor's signature verifies, so a
    masked input from a session this client never signed can never be unmasked into a sum.
    """

    min_clients: int = 0
    min_threshold: int = 0
    min_noise_multiplier: float = 0.0
    max_attempts_per_round: int = 1

    @property
    def requires_secure_aggregation(self) -> bool:
        return self.min_clients > 0 or self.min_threshold > 0 or self.min_noise_multiplier > 0

    def check_setup(self, setup: SessionSetup) -> None:
        """BelowPrivacyFloor unless the session's threshold and DP meet this site's floor."""
        threshold = setup.params.threshold
        if threshold < self.min_threshold:
            raise BelowPrivacyFloor(
                f"the coordinator would unmask sums of as few as {threshold} clients; this "
                f"site's floor (secagg_min_threshold) is {self.min_threshold}"
            )
        if self.min_noise_multiplier > 0:
            if setup.clip_norm == 0:
                raise BelowPrivacyFloor(
                    "the coordinator asks for updates without DP clipping and noise; this site's "
                    f"floor (dp_min_noise_multiplier) is {self.min_noise_multiplier:g}"
                )
            # Each client adds std z S / sqrt(t), so any sum of >= t carries at least z S.
            multiplier = setup.noise_std * math.sqrt(threshold) / setup.clip_norm
            if multiplier < self.min_noise_multiplier * (1 - 1e-9):
                raise BelowPrivacyFloor(
                    f"the coordinator's DP noise amounts to a noise multiplier of {multiplier:.4g}; "
                    f"this site's floor (dp_min_noise_multiplier) is {self.min_noise_multiplier:g}"
                )

    def check_cohort(self, clients: int) -> None:
        if clients < self.min_clients:
            raise BelowPrivacyFloor(
                f"the session's roster has {clients} clients; this site's floor "
                f"(secagg_min_clients) is {self.min_clients}"
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
    """Answers the five steps of the current session; a re-offered step (the upload of the
    answer broke off) gets the same answer again, never a second, different one."""

    def __init__(
        self,
        identity: str,
        credentials: Credentials | None,
        floor: PrivacyFloor = PrivacyFloor(),
        signed_sessions_file: Path | None = None,
    ) -> None:
        """`credentials` sign this client's keys and view and check its peers' (None:
        --insecure development mode, where nothing is signed or checked, so a malicious
        coordinator is not defended against). `signed_sessions_file` keeps the count of signed
        sessions across restarts (None: in memory only)."""
        self.identity = identity
        self._credentials = credentials
        self._floor = floor
        self._setup: SessionSetup | None = None
        self._client: SecAggClient | None = None
        self._vector: RingVector | None = None
        self._answers: dict[pb.TaskKind, bytes] = {}
        self._roster: dict[str, KeyAdvertisement] = {}
        self._statement: bytes | None = None  # the view this client signed
        self._attempt: tuple[int, bytes] = (0, b"")  # (round, global model digest)
        # Sessions whose survivor set this client signed, by round number and by model digest.
        self._signed = SignedSessions(signed_sessions_file)

    def admit(self, setup: SessionSetup, round_number: int, model_digest: bytes) -> None:
        """Refuse a session below this site's floor (BelowPrivacyFloor) or one more attempt at
        a round this client already contributed to as often as it allows (SecAggRefused);
        called before training, so a refused session costs nothing."""
        self._floor.check_setup(setup)
        spent = self._signed.spent(round_number, model_digest)
        if spent >= self._floor.max_attempts_per_round:
            raise SecAggRefused(
                f"this client already signed the survivors of {spent} session(s) of round "
                f"{round_number} or of this global model, its limit "
                "(secagg_max_attempts_per_round); another attempt could be subtracted from the "
                "last one"
            )

    def given_answer(self, kind: pb.TaskKind, setup: SessionSetup) -> bytes | None:
        """The answer already given to this step of this session, if any."""
        if self._setup is None or setup.params.session != self._setup.params.session:
            return None
        return self._answers.get(kind)

    def advertise(
        self, setup: SessionSetup, vector: RingVector, round_number: int, model_digest: bytes
    ) -> bytes:
        """Start a session with this client's encoded update: fresh keys, to advertise."""
        self.admit(setup, round_number, model_digest)
        self._setup, self._vector, self._answers = setup, vector, {}
        self._roster, self._statement = {}, None
        self._attempt = (round_number, model_digest)
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
            self._floor.check_cohort(len(roster))
            answer = shares_to_bytes(self._client.share_keys(roster))
            self._roster = roster
        elif kind == pb.TASK_KIND_SECAGG_MASKED_INPUT:
            assert self._vector is not None
            round_number, model_digest = self._attempt
            self.admit(setup, round_number, model_digest)
            bundles, contributors = inbox_from_bytes(message)
            masked = self._client.masked_input(self._vector, bundles, contributors)
            answer, self._vector = masked.tobytes(), None
        elif kind == pb.TASK_KIND_SECAGG_CONSISTENCY:
            request = unmask_request_from_bytes(message)
            round_number, model_digest = self._attempt
            self.admit(setup, round_number, model_digest)
            self._statement = self._client.agree(request, setup_digest(setup))
            # From here this session's sum may include this client's input: it counts, on disk
            # before the signature leaves (a crash in between errs on the side of counting).
            self._signed.record(round_number, model_digest)
            # --insecure has no certificates: the view's digest stands in, unauthenticated.
            signature = (
                hashlib.sha256(self._statement).digest()
                if self._credentials is None
                else sign_view(self._statement, self._credentials)
            )
            answer = view_signature_to_bytes(signature)
        else:
            request = unmask_request_from_bytes(message)
            if self._statement is None:
                raise SecAggRefused("asked to unmask before this client signed a survivor set")
            if self._credentials is not None:
                check_view_signatures(
                    request, self._statement, self._roster, self._credentials.ca_pem
                )
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
