"""Who may call the coordinator: checked on every call, before the round engine sees it.

The TLS handshake (BoringSSL inside gRPC) has already verified the client certificate when the
connection was made: a chain to the federation CA, inside its validity period; anything else
never reaches Python (gRPC logs "Handshake failed ... certificate has expired" and the like).
BoringSSL builds that chain itself, through any intermediate the client sends, and accepts
certificates fedlink does not (no client-auth usage, SHA-1 signatures, small RSA keys). So every
call checks the leaf again here, against the CA directly (`peer_certificate`), and checks what a
long-lived connection can outlive: the CA's and the certificate's validity, the allow-list
(when there is one) and the revocation list, which is reloaded whenever its file changes. Each
identity has one active session: a new `Join` supersedes the previous one.
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
from typing import Any, Literal

from cryptography import x509

from fedlink.common.errors import AccessDenied, PKIError
from fedlink.common.pki import (
    PeerCertificate,
    RevocationList,
    load_revocation_list,
    peer_certificate,
)
from fedlink.common.storage import write_durably
from fedlink.common.wire import JOIN_REQUIRED
from fedlink.server.config import ServerConfig
from fedlink.server.exclusions import Exclusions

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# The name of the file in `state_dir` that keeps the highest CRL number the coordinator has
# loaded, so a restart does not forget it and accept a rolled-back list.
CRL_NUMBER_FILE = "crl-number"


PeerRole = Literal["client", "admin"]


# Identities a coordinator serves at once, and more: with fewer entries than clients calling in
# turn the cache would almost never hit, and every call would check its certificate again
# (~0.2 ms each). An entry is about 2 KB, so a full cache is ~40 MB.
@lru_cache(maxsize=20_000)
def parse_peer(cert_pem: bytes, ca_pem: bytes, role: PeerRole = "client") -> PeerCertificate:
    """A call's peer certificate, checked against the CA once per distinct certificate and role
    (only successes are cached, so a refused certificate is checked, and refused, every time)."""
    return peer_certificate(cert_pem, ca_pem, role)


class RevocationWatch:
    """The federation's revocation list, reloaded when its file changes.

    Each `current()` costs one stat(); a new modification time, size or inode (an atomic
    replacement) triggers a reload. A replacement that cannot be read or verified is refused
    loudly and the last good list stays in force, so a bad copy never un-revokes anyone.
    """

    def __init__(self, path: Path, ca_pem: bytes, state_dir: Path) -> None:
        self._path = Path(path)
        self._ca_pem = ca_pem
        self._number_file = Path(state_dir) / CRL_NUMBER_FILE
        self._lock = threading.Lock()
        # A list that cannot be loaded at startup stops the coordinator (PKIError), and so does
        # one older than a list this state_dir has seen: a rollback survives no restart.
        self._stamp = self._file_stamp()
        self._list = load_revocation_list(self._path, ca_pem)
        seen = self._seen_number()
        if self._list.number < seen:
            raise PKIError(
                f"revocation list {self._path} has CRL number {self._list.number}, older than "
                f"number {seen} this coordinator loaded before (recorded in {self._number_file}); "
                "it would un-revoke certificates. Copy the current crl.pem from the CA directory"
            )
        try:
            self._record_number(seen)
        except OSError as exc:
            raise PKIError(f"cannot write {self._number_file}: {exc.strerror}") from None
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
                        previous, self._list = self._list.number, loaded
                        try:
                            self._record_number(previous)
                        except OSError as exc:
                            # The new list is in force; only a restart could forget it.
                            log.error("cannot write %s: %s", self._number_file, exc.strerror)
                        log.info(
                            "reloaded revocation list %s: %d revoked certificate(s) (CRL number %d)",
                            self._path,
                            len(loaded.revoked),
                            loaded.number,
                        )
            return self._list

    def _seen_number(self) -> int:
        try:
            return int(self._number_file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise PKIError(
                f"cannot read the last CRL number from {self._number_file} ({exc}); restore it, "
                "or delete it to trust the current revocation list"
            ) from None

    def _record_number(self, recorded: int) -> None:
        if self._list.number > recorded:
            self._number_file.parent.mkdir(parents=True, exist_ok=True)
            write_durably(self._number_file, f"{self._list.number}\n".encode())

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self._path)
        except OSError:
            # Mid-replacement or deleted: the last good list stays in force.
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)


class AccessPolicy:
    """The federation CA, the allow-list, the revocation list, the validity periods and the
    clients an administrator excluded."""

    def __init__(
        self,
        ca_pem: bytes,
        allowed: Collection[str] = (),
        revocations: RevocationWatch | None = None,
        clock: Clock = _utc_now,
        exclusions: Exclusions | None = None,
    ) -> None:
        self._ca_pem = ca_pem
        ca = x509.load_pem_x509_certificate(ca_pem)
        self._ca_not_before = ca.not_valid_before_utc
        self._ca_not_after = ca.not_valid_after_utc
        self._allowed = frozenset(allowed)
        self._revocations = revocations
        self._clock = clock
        self.exclusions = exclusions

    @classmethod
    def from_config(cls, config: ServerConfig) -> AccessPolicy:
        """The policy `config` asks for; a revocation list that cannot be loaded is an error
        (PKIError), so the coordinator never starts believing nobody is revoked."""
        assert config.ca is not None, "a coordinator with TLS has a CA certificate"
        try:
            ca_pem = config.ca.read_bytes()
        except OSError as exc:
            raise PKIError(f"cannot read the CA certificate {config.ca}: {exc.strerror}") from None
        revocations = None
        if config.revocation_list is not None:
            revocations = RevocationWatch(config.revocation_list, ca_pem, config.state_dir)
        exclusions = Exclusions(config.state_dir)
        return cls(ca_pem, config.allowed_clients, revocations, exclusions=exclusions)

    def peer_of(
        self, auth_context: Mapping[str, Any], role: PeerRole = "client"
    ) -> PeerCertificate:
        """The identity of the client certificate the TLS handshake verified for a call (its
        `auth_context()`), checked by `identify`; AccessDenied (UNAUTHENTICATED) without one."""
        certs = auth_context.get("x509_pem_cert")
        if not certs:
            raise AccessDenied("UNAUTHENTICATED", "a client certificate is required")
        pem = certs[0]
        return self.identify(pem if isinstance(pem, bytes) else str(pem).encode(), role)

    def identify(self, cert_pem: bytes, role: PeerRole = "client") -> PeerCertificate:
        """The identity `cert_pem` establishes in `role`; AccessDenied (UNAUTHENTICATED) for a
        certificate the CA did not sign directly, a CA certificate, one without client-auth
        usage or of another role (an admin certificate is no client, and the reverse), weak
        algorithms or a name fedlink would not issue."""
        try:
            return parse_peer(cert_pem, self._ca_pem, role)
        except PKIError as exc:
            raise AccessDenied("UNAUTHENTICATED", str(exc)) from None

    def check(self, peer: PeerCertificate, *, allow_list: bool = True) -> None:
        """Raise AccessDenied (with the gRPC status to answer) unless `peer` may call now.
        `allow_list=False` checks only the certificate (validity, revocation): the health
        check's Check, which holds nothing, answers any unrevoked certificate of the CA, and the
        Admin service's callers are no clients (no allow-list, no exclusion)."""
        now = self._clock()
        if not self._ca_not_before <= now <= self._ca_not_after:
            raise AccessDenied(
                "UNAUTHENTICATED",
                f"the federation CA is valid from {self._ca_not_before:%Y-%m-%d %H:%M:%S} to "
                f"{self._ca_not_after:%Y-%m-%d %H:%M:%S} UTC, so no certificate it issued is "
                "valid now; the operator must create a new CA (`fedlink certs init --force`) "
                "and reissue every certificate",
            )
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
        if allow_list and self.exclusions is not None:
            self.exclusions.check(peer.identity)
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
