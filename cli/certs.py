"""The `fedlink certs` commands: create the federation CA and issue participant certificates.

Only argument parsing and printing live here; everything else is in `fedlink.common.pki`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlink.common.errors import PKIError
from fedlink.common.pki import (
    CA_KEY_FILE,
    DEFAULT_CA_DAYS,
    DEFAULT_CA_NAME,
    DEFAULT_CERT_DAYS,
    init_ca,
    issue_certificate,
)

# Exit status for a PKI problem the user can fix (argparse itself uses 2 for usage errors).
EXIT_PKI_ERROR = 2


def add_certs_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `certs init` and `certs issue` to the top-level parser; each sets `func(args) -> int`."""
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
        help="issue a server or client certificate",
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, got {value}")
    return value
