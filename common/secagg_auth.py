"""Advertised secure-aggregation keys, bound to the federation's client certificates.

Clients receive each other's public keys through the coordinator. Unsigned, a coordinator could
replace a client's keys with its own (a man in the middle) and read the secret shares meant for
it. So each client signs its advertisement with the private key of its TLS client certificate,
over the session id, its identity and both public keys (`advertisement_statement`), and every
peer checks the signature, that the certificate was issued by the federation CA and that it
names the identity the roster lists. The coordinator checks the same on arrival, so one client's
bad advertisement is refused before it can make every peer refuse the roster.

The same keys sign each survivor's view of the session in the consistency step
(`view_statement`): a client unmasks only when every survivor's signature over its own view
verifies, with the certificate that survivor advertised its keys with.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedlink.common.errors import PKIError, SecAggError, SecAggRefused
from fedlink.common.pki import Credentials, sign_statement, verify_statement
from fedlink.common.secagg import KeyAdvertisement, UnmaskRequest, advertisement_statement


def sign_advertisement(
    advertisement: KeyAdvertisement, session: str, identity: str, credentials: Credentials
) -> KeyAdvertisement:
    statement = advertisement_statement(session, identity, advertisement)
    return KeyAdvertisement(
        cipher_key=advertisement.cipher_key,
        mask_key=advertisement.mask_key,
        certificate=credentials.cert_pem,
        signature=sign_statement(credentials.key_pem, statement),
    )


def check_advertisement(
    advertisement: KeyAdvertisement, session: str, identity: str, ca_pem: bytes
) -> None:
    """SecAggError unless `identity`'s federation certificate signed these keys for `session`."""
    if not advertisement.certificate or not advertisement.signature:
        raise SecAggError(f"the keys advertised for {identity!r} are not signed")
    statement = advertisement_statement(session, identity, advertisement)
    try:
        verify_statement(
            advertisement.certificate, ca_pem, identity, statement, advertisement.signature
        )
    except PKIError as exc:
        raise SecAggError(f"the keys advertised for {identity!r} are not its own: {exc}") from None


def sign_view(statement: bytes, credentials: Credentials) -> bytes:
    """This client's signature over its `view_statement` for the consistency step."""
    return sign_statement(credentials.key_pem, statement)


def check_view_signatures(
    request: UnmaskRequest,
    statement: bytes,
    roster: Mapping[str, KeyAdvertisement],
    ca_pem: bytes,
) -> None:
    """SecAggRefused unless every survivor signed `statement` (this client's own view) with the
    federation certificate it advertised its keys with: then all of them, at least the
    threshold, saw the same setup, roster, U2 and U3."""
    for survivor in request.survivors:
        signature = request.signatures.get(survivor, b"")
        if not signature or survivor not in roster:
            raise SecAggRefused(f"{survivor!r} did not sign the survivor set")
        try:
            verify_statement(roster[survivor].certificate, ca_pem, survivor, statement, signature)
        except PKIError as exc:
            raise SecAggRefused(
                f"{survivor!r} signed another view of this session than this client's (another "
                f"setup, roster, U2 or U3), or not at all: {exc}"
            ) from None


def check_view_signature(
    signature: bytes,
    statement: bytes,
    identity: str,
    advertisement: KeyAdvertisement,
    ca_pem: bytes,
) -> None:
    """SecAggError unless `identity` signed `statement` with the certificate it advertised its
    keys with: the coordinator's check on arrival."""
    try:
        verify_statement(advertisement.certificate, ca_pem, identity, statement, signature)
    except PKIError as exc:
        raise SecAggError(
            f"{identity!r}'s signature does not cover the coordinator's view of the session: {exc}"
        ) from None
