"""The `fedlink certs` commands: create the federation CA, issue and revoke certificates.

Only argument parsing and printing live here; everything else is in `fedlink.common.pki`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography import x509

from fedlink.common.errors import PKIError
from fedlink.common.pki import (
    CA_KEY_FILE,
    DEFAULT_CA_DAYS,
    DEFAULT_CA_NAME,
    DEFAULT_CERT_DAYS,
    init_ca,
    issue_certificate,
    revoke_certificate,
)

# `--reason` spellings: the RFC 5280 reason codes a federation operator would use.
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}

# Exit status for a PKI problem the user can fix (argparse itself uses 2 for usage errors).
EXIT_PKI_ERROR = 2


def add_certs_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `certs init`, `issue` and `revoke` to the top-level parser; each sets `func(args)`."""
    certs = subparsers.add_parser(
        "certs",
        help="create the federation CA and issue certificates",
        description="Manage the federation's private CA and the certificates used for mutual TLS.",
    )
    commands = certs.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="create the federation CA (ca.pem, ca.key)",
        description=(
            "Create a self-signed federation CA in DIR. Keep ca.key secret: whoever holds it "
            "can join the federation under any name."
        ),
    )
    init.add_argument("--dir", type=Path, required=True, help="directory for ca.pem and ca.key")
    init.add_argument(
        "--name", default=DEFAULT_CA_NAME, help="CA common name (default: %(default)s)"
    )
    init.add_argument(
        "--days",
        type=_positive_int,
        default=DEFAULT_CA_DAYS,
        help="validity (default: %(default)s)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=_run_init)

    issue = commands.add_parser(
        "issue",
        help="issue a server, client or admin certificate",
        description=(
            "Issue a certificate signed by the federation CA and write the participant's bundle "
            "(NAME.pem, NAME.key, ca.pem) into OUT."
        ),
    )
    issue.add_argument("--ca-dir", type=Path, required=True, help="directory of the federation CA")
    issue.add_argument("--out", type=Path, required=True, help="directory for the bundle")
    issue.add_argument(
        "--name", required=True, help="certificate name; a client's identity (e.g. client-1)"
    )
    role = issue.add_mutually_exclusive_group(required=True)
    role.add_argument(
        "--server", dest="role", action="store_const", const="server", help="coordinator cert"
    )
    role.add_argument(
        "--client", dest="role", action="store_const", const="client", help="client certificate"
    )
    role.add_argument(
        "--admin",
        dest="role",
        action="store_const",
        const="admin",
        help="operator certificate: may call the Admin service (`fedlink status`), nothing else",
    )
    issue.add_argument(
        "--host",
        dest="hosts",
        action="extend",
        nargs="+",
        default=[],
        metavar="H",
        help="DNS name or IP address clients connect to (server only; repeatable)",
    )
    issue.add_argument(
        "--days",
        type=_positive_int,
        default=DEFAULT_CERT_DAYS,
        help="validity (default: %(default)s)",
    )
    issue.add_argument("--force", action="store_true", help="replace an existing NAME.pem/.key")
    issue.set_defaults(func=_run_issue)

    revoke = commands.add_parser(
        "revoke",
        help="revoke a certificate (writes the CA's crl.pem)",
        description=(
            "Add a certificate to the federation's revocation list, CA_DIR/crl.pem: an X.509 CRL "
            "signed by the CA. Copy crl.pem to the coordinator (the file named by its "
            "revocation_list setting); it reloads the list when the file changes, and refuses "
            "every call made with a revoked certificate."
        ),
    )
    revoke.add_argument("--ca-dir", type=Path, required=True, help="directory of the federation CA")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--cert", type=Path, help="the certificate (PEM) to revoke")
    which.add_argument(
        "--serial",
        type=_serial_number,
        help="its serial number in hex, when the certificate file is lost",
    )
    revoke.add_argument("--reason", choices=sorted(REASONS), help="why (recorded in the CRL entry)")
    revoke.set_defaults(func=_run_revoke)


def _run_init(args: argparse.Namespace) -> int:
    try:
        paths = init_ca(args.dir, name=args.name, days=args.days, force=args.force)
    except PKIError as exc:
        print(f"fedlink certs init: error: {exc}", file=sys.stderr)
        return EXIT_PKI_ERROR
    print(f"CA certificate: {paths.cert}")
    print(f"CA key:         {paths.key}  (keep it secret; never copy it to participants)")
    return 0


def _run_issue(args: argparse.Namespace) -> int:
    try:
        paths = issue_certificate(
            args.ca_dir,
            args.out,
            args.name,
            role=args.role,
            hosts=args.hosts,
            days=args.days,
            force=args.force,
        )
    except PKIError as exc:
        print(f"fedlink certs issue: error: {exc}", file=sys.stderr)
        return EXIT_PKI_ERROR
    print(f"certificate:    {paths.cert}")
    print(f"private key:    {paths.key}")
    print(f"CA certificate: {paths.ca}")
    print(f"give {args.name} these three files (not {CA_KEY_FILE})")
    return 0


def _run_revoke(args: argparse.Namespace) -> int:
    try:
        result = revoke_certificate(
            args.ca_dir,
            cert=args.cert,
            serial=args.serial,
            reason=REASONS[args.reason] if args.reason else None,
        )
    except PKIError as exc:
        print(f"fedlink certs revoke: error: {exc}", file=sys.stderr)
        return EXIT_PKI_ERROR
    if result.already_revoked:
        print(f"serial {result.serial:x} was already revoked; {result.crl} is unchanged")
    else:
        print(f"revoked serial {result.serial:x}")
    print(f"revocation list: {result.crl}  ({result.total} revoked)")
    print("copy it to the file named by the coordinator's revocation_list; it reloads on change")
    return 0


def _serial_number(text: str) -> int:
    try:
        return int(text.replace(":", ""), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a hex serial number, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, got {value}")
    return value
