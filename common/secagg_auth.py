"""Advertised secure-aggregation keys, bound to the federation's client certificates.

Clients receive each other's public keys through the coordinator. Unsigned, a coordinator could
replace a client's keys with its own (a man in the middle) and read the secret shares meant for
it. So each client signs its advertisement with the private key of its TLS client certificate,
over the session id, its identity and both public keys (`advertisement_statement`), and every
peer checks the signature, that the certificate was issued by the federation CA and that it
names the identity the roster lists. The coordinator checks the same on arrival, so one client's
bad advertisement is refused before it can make every peer refuse the roster.
"""

from __future__ import annotations

from fedlink.common.errors import PKIError, SecAggError
from fedlink.common.pki import Credentials, sign_statement, verify_statement
from fedlink.common.secagg import KeyAdvertisement, advertisement_statement


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
