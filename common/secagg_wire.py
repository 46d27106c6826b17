"""Secure aggregation's messages on the task channel (protos/fedlink/v1/federation.proto).

Each step of a session (secagg.py) is a task kind; its payload is one small protobuf message,
serialized and sent through the chunked payload machinery (wire.py) with
`PayloadInfo.encoding` naming the message, and the masked vector travels as raw little-endian
ring elements. Everything parsed here comes from the other side of the channel: malformed bytes,
wrong key or share lengths and out-of-range settings raise SecAggError, never anything else.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from fedlink.common.errors import SecAggError
from fedlink.common.fixedpoint import FixedPoint
from fedlink.common.secagg import (
    PUBLIC_KEY_BYTES,
    KeyAdvertisement,
    SecAggParams,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlink.common.shamir import Share
from fedlink.common.wire import ENCODING as MODEL_ENCODING
from fedlink.v1 import federation_pb2 as pb

KEYS_ENCODING = pb.SecAggKeys.DESCRIPTOR.full_name
ROSTER_ENCODING = pb.SecAggRoster.DESCRIPTOR.full_name
SHARES_ENCODING = pb.SecAggShares.DESCRIPTOR.full_name
UNMASK_REQUEST_ENCODING = pb.SecAggUnmaskRequest.DESCRIPTOR.full_name
UNMASK_RESPONSE_ENCODING = pb.SecAggUnmaskResponse.DESCRIPTOR.full_name
VIEW_SIGNATURE_ENCODING = pb.SecAggViewSignature.DESCRIPTOR.full_name
_EXACT_FLOAT_BITS = 52
# A fedlink client certificate is under 1 KB of PEM; anything near this is not one.
MAX_CERTIFICATE_BYTES = 16 << 10
MAX_SIGNATURE_BYTES = 512

_M = TypeVar("_M", bound=Message)


def ring_encoding(ring_bits: int) -> str:
    """The payload encoding of a masked vector: raw little-endian ring elements."""
    return f"ring-u{ring_bits}le"


class SecAggStep(enum.Enum):
    """A session's five steps; both sides name their task kinds for them SECAGG_<NAME>."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"

    def encodings(self, ring_bits: int) -> tuple[str, str]:
        """(the encoding of this step's task payload, of the client's answer)."""
        return {
            SecAggStep.ADVERTISE: (MODEL_ENCODING, KEYS_ENCODING),
            SecAggStep.SHARE_KEYS: (ROSTER_ENCODING, SHARES_ENCODING),
            SecAggStep.MASKED_INPUT: (SHARES_ENCODING, ring_encoding(ring_bits)),
            SecAggStep.CONSISTENCY: (UNMASK_REQUEST_ENCODING, VIEW_SIGNATURE_ENCODING),
            SecAggStep.UNMASK: (UNMASK_REQUEST_ENCODING, UNMASK_RESPONSE_ENCODING),
        }[self]


@dataclass(frozen=True)
class SessionSetup:
    """Everything a client needs to take part in one session: TaskHeader.secagg."""

    params: SecAggParams
    encoding: FixedPoint
    max_weight: float
    noise_std: float = 0.0  # split-noise DP: this client's Gaussian std
    clip_norm: float = 0.0  # DP clip norm (0: no clipping)

    def __post_init__(self) -> None:
        if self.encoding.ring_bits != self.params.ring_bits:
            raise SecAggError(
                f"the fixed-point encoding uses a {self.encoding.ring_bits}-bit ring, the session "
                f"a {self.params.ring_bits}-bit one"
            )
        for name, value in (
            ("max_weight", self.max_weight),
            ("value_bound", self.encoding.value_bound),
        ):
            if not (math.isfinite(value) and value > 0):
                raise SecAggError(f"secure aggregation's {name} must be positive, got {value}")
        for name, value in (("noise_std", self.noise_std), ("clip_norm", self.clip_norm)):
            if not (math.isfinite(value) and value >= 0):
                raise SecAggError(f"secure aggregation's {name} must be >= 0, got {value}")
        # V * 2^f <= 2^52: every scaled value is an integer float64 represents exactly.
        largest = math.floor(_EXACT_FLOAT_BITS - math.log2(self.encoding.value_bound))
        if not 0 <= self.encoding.frac_bits <= largest:
            raise SecAggError(
                f"frac_bits={self.encoding.frac_bits} is out of range for value bound "
                f"{self.encoding.value_bound:g} (0..{largest})"
            )


def setup_to_proto(setup: SessionSetup) -> pb.SecAggSetup:
    return pb.SecAggSetup(
        session=setup.params.session,
        threshold=setup.params.threshold,
        ring_bits=setup.params.ring_bits,
        vector_length=setup.params.vector_length,
        frac_bits=setup.encoding.frac_bits,
        value_bound=setup.encoding.value_bound,
        max_weight=setup.max_weight,
        noise_std=setup.noise_std,
        clip_norm=setup.clip_norm,
        neighbours=setup.params.neighbours,
        neighbour_threshold=setup.params.neighbour_threshold,
    )


def setup_digest(setup: SessionSetup) -> bytes:
    """SHA-256 of the whole setup as it travels: part of the view every survivor signs, so
    clients told different thresholds, graphs, encodings or DP settings never agree."""
    return hashlib.sha256(setup_to_proto(setup).SerializeToString(deterministic=True)).digest()


def setup_from_proto(message: pb.SecAggSetup) -> SessionSetup:
    try:
        params = SecAggParams(
            session=message.session,
            threshold=message.threshold,
            vector_length=message.vector_length,
            ring_bits=message.ring_bits,
            neighbours=message.neighbours,
            neighbour_threshold=message.neighbour_threshold,
        )
    except ValueError as exc:
        raise SecAggError(
            f"the coordinator sent an invalid secure-aggregation setup: {exc}"
        ) from None
    encoding = FixedPoint(
        ring_bits=message.ring_bits, frac_bits=message.frac_bits, value_bound=message.value_bound
    )
    return SessionSetup(params, encoding, message.max_weight, message.noise_std, message.clip_norm)


def keys_to_bytes(advertisement: KeyAdvertisement) -> bytes:
    return _keys_message(advertisement).SerializeToString()


def _keys_message(advertisement: KeyAdvertisement) -> pb.SecAggKeys:
    return pb.SecAggKeys(
        cipher_key=advertisement.cipher_key,
        mask_key=advertisement.mask_key,
        certificate=advertisement.certificate,
        signature=advertisement.signature,
    )


def keys_from_bytes(data: bytes) -> KeyAdvertisement:
    return _keys(_parse(pb.SecAggKeys, data))


def roster_to_bytes(roster: Mapping[str, KeyAdvertisement]) -> bytes:
    message = pb.SecAggRoster()
    for identity, advertisement in roster.items():
        message.keys[identity].CopyFrom(_keys_message(advertisement))
    return message.SerializeToString(deterministic=True)


def roster_from_bytes(data: bytes) -> dict[str, KeyAdvertisement]:
    message = _parse(pb.SecAggRoster, data)
    return {identity: _keys(keys) for identity, keys in sorted(message.keys.items())}


def shares_to_bytes(bundles: Mapping[str, bytes], contributors: Iterable[str] = ()) -> bytes:
    """Encrypted share bundles by peer (recipient when a client pushes, sender when it pulls),
    and when it pulls U2, every client whose bundles arrived."""
    message = pb.SecAggShares(bundles=dict(bundles), contributors=sorted(contributors))
    return message.SerializeToString(deterministic=True)


def shares_from_bytes(data: bytes) -> dict[str, bytes]:
    return dict(sorted(_parse(pb.SecAggShares, data).bundles.items()))


def inbox_from_bytes(data: bytes) -> tuple[dict[str, bytes], tuple[str, ...]]:
    """A client's share bundles by sender, and U2 as the coordinator announces it."""
    message = _parse(pb.SecAggShares, data)
    contributors = tuple(message.contributors)
    if len(set(contributors)) != len(contributors):
        raise SecAggError("the announced contributors list a client twice")
    return dict(sorted(message.bundles.items())), contributors


def unmask_request_to_bytes(request: UnmaskRequest) -> bytes:
    return pb.SecAggUnmaskRequest(
        survivors=request.survivors, dropped=request.dropped, signatures=dict(request.signatures)
    ).SerializeToString(deterministic=True)


def unmask_request_from_bytes(data: bytes) -> UnmaskRequest:
    message = _parse(pb.SecAggUnmaskRequest, data)
    survivors, dropped = tuple(message.survivors), tuple(message.dropped)
    if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
        raise SecAggError("the unmasking request lists a client twice")
    if any(len(signature) > MAX_SIGNATURE_BYTES for signature in message.signatures.values()):
        raise SecAggError("a survivor's signature is implausibly large")
    return UnmaskRequest(survivors, dropped, dict(sorted(message.signatures.items())))


def view_signature_to_bytes(signature: bytes) -> bytes:
    return pb.SecAggViewSignature(signature=signature).SerializeToString()


def view_signature_from_bytes(data: bytes) -> bytes:
    signature = _parse(pb.SecAggViewSignature, data).signature
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SecAggError("a view signature is implausibly large")
    return signature


def unmask_response_to_bytes(response: UnmaskResponse) -> bytes:
    return pb.SecAggUnmaskResponse(
        self_mask_shares={
            peer: share.to_bytes() for peer, share in response.self_mask_shares.items()
        },
        mask_key_shares={
            peer: share.to_bytes() for peer, share in response.mask_key_shares.items()
        },
    ).SerializeToString(deterministic=True)


def unmask_response_from_bytes(data: bytes) -> UnmaskResponse:
    message = _parse(pb.SecAggUnmaskResponse, data)
    return UnmaskResponse(
        self_mask_shares={
            peer: Share.from_bytes(share)
            for peer, share in sorted(message.self_mask_shares.items())
        },
        mask_key_shares={
            peer: Share.from_bytes(share) for peer, share in sorted(message.mask_key_shares.items())
        },
    )


def _keys(message: pb.SecAggKeys) -> KeyAdvertisement:
    for key in (message.cipher_key, message.mask_key):
        if len(key) != PUBLIC_KEY_BYTES:
            raise SecAggError(
                f"an advertised public key is {len(key)} bytes, not {PUBLIC_KEY_BYTES}"
            )
    if (
        len(message.certificate) > MAX_CERTIFICATE_BYTES
        or len(message.signature) > MAX_SIGNATURE_BYTES
    ):
        raise SecAggError("an advertisement's certificate or signature is implausibly large")
    return KeyAdvertisement(
        cipher_key=message.cipher_key,
        mask_key=message.mask_key,
        certificate=message.certificate,
        signature=message.signature,
    )


def _parse(kind: type[_M], data: bytes) -> _M:
    message = kind()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise SecAggError(f"malformed {kind.DESCRIPTOR.name} message: {exc}") from None
    return message
