"""Who may call the coordinator: checked on every call, before the round engine sees it.

The TLS handshake (BoringSSL inside gRPC) has already verified the client certificate when the
connection was made: signed by the federation CA, a client certificate, inside its validity
period; anything else never reaches Python (gRPC logs "Handshake failed ... certificate has
expired" and the like). A connection outlives its handshake, though, so every call is checked
again here: the certificate must still be valid, its name on the allow-list (when there is
one), and its serial number absent from the revocation list, which is reloaded whenever its
file changes. Each identity has one active session: a new `Join` supersedes the previous one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedlink.common.errors import AccessDenied, PKIError
from fedlink.common.pki import (
    PeerCertificate,
    RevocationList,
    load_revocation_list,
    peer_certificate,
)
from fedlink.common.wire import JOIN_REQUIRED
from fedlink.server.config import ServerConfig

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@lru_cache(maxsize=4096)
def parse_peer(cert_pem: bytes) -> PeerCertificate:
    """The verified peer certificate of a call, parsed once per distinct certificate."""
    return peer_certificate(cert_pem)


def verified_peer(auth_context: Mapping[str, Any]) -> PeerCertificate:
    """The client certificate the TLS handshake verified for a call (its `auth_context()`);
    AccessDenied(UNAUTHENTICATED) when there is none or it cannot be parsed."""
    certs = auth_context.get("x509_pem_cert")
    if not certs:
        raise AccessDenied("UNAUTHENTICATED", "a client certificate is required")
    pem = certs[0]
    try:
        return parse_peer(pem if isinstance(pem, bytes) else str(pem).encode())
    except PKIError as exc:
        raise AccessDenied("UNAUTHENTICATED", str(exc)) from None


class RevocationWatch:
    """The federation's revocation list, reloaded when its file changes.

    Each `current()` costs one stat(); a new modification time, size or inode (an atomic
    replacement) triggers a reload. A replacement that cannot be read or verified is refused
    loudly and the last good list stays in force, so a bad copy never un-revokes anyone.
    """

    def __init__(self, path: Path, ca_pem: bytes) -> None:
        self._path = Path(path)
        self._ca_pem = ca_pem
        self._lock = threading.Lock()
        # A list that cannot be loaded at startup stops the coordinator (PKIError).
        self._stamp = self._file_stamp()
        self._list = load_revocation_list(self._path, ca_pem)
        log.info(
            "revocation list %s: %d revoked certificate(s) (CRL number %d)",
            self._path,
            len(self._list.revoked),
            self._list.number,
        )

    def current(self) -> RevocationList:
        stamp = self._file_stamp()
        with self._lock:
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                try:
                    loaded = load_revocation_list(self._path, self._ca_pem)
                except PKIError as exc:
                    log.error("keeping the previous revocation list: %s", exc)
                else:
                    if loaded.number < self._list.number:
                        log.error(
                            "keeping the previous revocation list: %s has CRL number %d, older "
                            "than the loaded %d",
                            self._path,
                            loaded.number,
                            self._list.number,
                        )
                    else:
                        self._list = loaded
                        log.info(
                            "reloaded revocation list %s: %d revoked certificate(s) (CRL number %d)",
                            self._path,
                            len(loaded.revoked),
                            loaded.number,
                        )
            return self._list

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self._path)
        except OSError:
            # Mid-replacement or deleted: the last good list stays in force.
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)


class AccessPolicy:
    """The allow-list, the revocation list and the certificate's validity period."""

    def __init__(
        self,
        allowed: Collection[str] = (),
        revocations: RevocationWatch | None = None,
        clock: Clock = _utc_now,
    ) -> None:
        self._allowed = frozenset(allowed)
        self._revocations = revocations
        self._clock = clock

    @classmethod
    def from_config(cls, config: ServerConfig) -> AccessPolicy:
        """The policy `config` asks for; a revocation list that cannot be loaded is an error
        (PKIError), so the coordinator never starts believing nobody is revoked."""
        revocations = None
        if config.revocation_list is not None and config.ca is not None:
            try:
                ca_pem = config.ca.read_bytes()
            except OSError as exc:
                raise PKIError(
                    f"cannot read the CA certificate {config.ca}: {exc.strerror}"
                ) from None
            revocations = RevocationWatch(config.revocation_list, ca_pem)
        return cls(config.allowed_clients, revocations)

    def check(self, peer: PeerCertificate, *, allow_list: bool = True) -> None:
        """Raise AccessDenied (with the gRPC status to answer) unless `peer` may call now.
        `allow_list=False` checks only the certificate (validity, revocation): the health
        check's Check, which holds nothing, answers any unrevoked certificate of the CA."""
        now = self._clock()
        if now > peer.not_after:
            raise AccessDenied(
                "UNAUTHENTICATED",
                f"the client certificate of {peer.identity!r} expired on "
                f"{peer.not_after:%Y-%m-%d %H:%M:%S} UTC; issue a new one with "
                "`fedlink certs issue --client`",
            )
        if now < peer.not_before:
            raise AccessDenied(
                "UNAUTHENTICATED",
                f"the client certificate of {peer.identity!r} is not valid until "
                f"{peer.not_before:%Y-%m-%d %H:%M:%S} UTC; check the clocks of both machines",
            )
        if allow_list and self._allowed and peer.identity not in self._allowed:
            raise AccessDenied(
                "PERMISSION_DENIED",
                f"client {peer.identity!r} is not on this federation's allow-list; ask the "
                "coordinator's operator to add it to allowed_clients",
            )
        if self._revocations is not None:
            revoked_at = self._revocations.current().revoked.get(peer.serial)
            if revoked_at is not None:
                raise AccessDenied(
                    "PERMISSION_DENIED",
                    f"the certificate of {peer.identity!r} (serial {peer.serial:x}) was revoked "
                    f"on {revoked_at:%Y-%m-%d %H:%M} UTC; ask the federation's operator for a "
                    "new one",
                )


@dataclass(frozen=True)
class _Session:
    token: str
    identity: str
    joined_at: dt.datetime
    peer: str


class Sessions:
    """One active session per identity; the newest `Join` supersedes the previous session.

    A session is a token handed out by `Join` (trailing metadata `fedlink-session`) that the
    client sends back with every call. A call with an older token is refused with
    FAILED_PRECONDITION, so a second process with the same certificate never takes part twice;
    a call without a token acts for the identity's current session (whoever holds the key may
    `Join` anyway). In insecure development mode the token is the only identity there is.
    """

    def __init__(self, clock: Clock = _utc_now) -> None:
        self._by_identity: dict[str, _Session] = {}
        self._by_token: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def open(self, identity: str, peer: str) -> tuple[str, bool]:
        """Start `identity`'s session; returns its token and whether one was superseded."""
        session = _Session(secrets.token_hex(16), identity, self._clock(), peer)
        with self._lock:
            previous = self._by_identity.get(identity)
            if previous is not None:
                del self._by_token[previous.token]
            self._by_identity[identity] = session
            self._by_token[session.token] = session
        return session.token, previous is not None

    def identity_of(self, token: str | None) -> str | None:
        """The identity a token was issued to (insecure mode), or None."""
        with self._lock:
            session = self._by_token.get(token) if token is not None else None
        return session.identity if session is not None else None

    def check(self, identity: str, token: str | None) -> None:
        with self._lock:
            current = self._by_identity.get(identity)
        if current is None:
            raise AccessDenied("FAILED_PRECONDITION", JOIN_REQUIRED)
        if token is not None and token != current.token:
            raise AccessDenied(
                "FAILED_PRECONDITION",
                f"this session of {identity!r} was superseded: the same certificate joined "
                f"again at {current.joined_at:%H:%M:%S} UTC from {current.peer}. Only the newest "
                "session takes part; stop the other process, or give each site its own "
                "certificate",
            )
