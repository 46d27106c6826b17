"""`fedlink status` and `fedlink admin`: the coordinator's Admin service, for operators.

Both present an admin certificate (`fedlink certs issue --admin`); the coordinator refuses
client and server certificates. `status` prints the run and its clients as a table (or JSON),
once or every few seconds (`--watch`); `admin stop` stops the run as SIGTERM would, `admin
exclude NAME` refuses a client for the rest of the run. Settings come from flags,
`FEDLINK_ADMIN_*` variables or a TOML file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from fedlink.common.config import ENV_PREFIX, add_config_arguments, load_config
from fedlink.common.errors import ConfigError
from fedlink.common.pki import load_credentials
from fedlink.v1 import admin_pb2 as pb
from fedlink.v1 import admin_pb2_grpc as pb_grpc

ENV_PREFIX_ADMIN = ENV_PREFIX + "ADMIN_"
EXIT_FAILED = 1


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class AdminConfig:
    server: str = field(default="127.0.0.1:50051", metadata=_help("coordinator host:port"))
    server_name: str | None = field(
        default=None,
        metadata=_help(
            "expected name in the server certificate, when it differs from the host in --server"
        ),
    )
    cert: Path | None = field(
        default=None, metadata=_help("admin certificate (`fedlink certs issue --admin`)")
    )
    key: Path | None = field(default=None, metadata=_help("its private key (PEM)"))
    ca: Path | None = field(default=None, metadata=_help("federation CA certificate"))
    timeout_seconds: float = field(default=10.0, metadata=_help("give up a call after this long"))
    json: bool = field(default=False, metadata=_help("status: print JSON instead of a table"))
    watch: bool = field(default=False, metadata=_help("status: print again every interval"))
    interval_seconds: float = field(default=2.0, metadata=_help("status --watch: seconds between"))
    log_lines: int = field(default=10, metadata=_help("status: recent log lines to show"))

    def __post_init__(self) -> None:
        if not (self.cert and self.key and self.ca):
            raise ConfigError(
                "the Admin service requires an admin certificate: pass --cert, --key and --ca "
                f"(or {ENV_PREFIX_ADMIN}CERT, _KEY, _CA) from `fedlink certs issue --admin`"
            )
        if not (self.timeout_seconds > 0 and self.interval_seconds > 0):  # also refuses NaN
            raise ConfigError("timeout_seconds and interval_seconds must be positive")
        if self.log_lines < 0:
            raise ConfigError(f"log_lines must be 0 or more, got {self.log_lines}")


def add_admin_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser(
        "status",
        help="show a running federation: round, phase, clients, recent log (admin certificate)",
        description=(
            "Ask the coordinator's Admin service for the run's status. Needs an admin "
            f"certificate. Every flag can also be set as {ENV_PREFIX_ADMIN}<NAME>."
        ),
    )
    add_config_arguments(status, AdminConfig)
    status.set_defaults(func=_run_status)

    admin = subparsers.add_parser(
        "admin",
        help="stop the run, or exclude a client from it (admin certificate)",
        description=(
            "Act on a running federation through the coordinator's Admin service. Every flag "
            f"can also be set as {ENV_PREFIX_ADMIN}<NAME>."
        ),
    )
    actions = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    stop = actions.add_parser(
        "stop", help="stop the run as SIGTERM would; a restart on its state_dir resumes it"
    )
    exclude = actions.add_parser(
        "exclude", help="refuse a client for the rest of the run (kept across restarts)"
    )
    exclude.add_argument("client", help="the client's identity (its certificate name)")
    for action in (stop, exclude):
        add_config_arguments(action, AdminConfig)
        action.add_argument("--reason", default="", help="why (logged; shown to the client)")
    stop.set_defaults(func=_run_stop)
    exclude.set_defaults(func=_run_exclude)


def _config(args: argparse.Namespace) -> AdminConfig:
    return load_config(
        AdminConfig, path=args.config, overrides=vars(args), env_prefix=ENV_PREFIX_ADMIN
    )


def _stub(config: AdminConfig) -> tuple[grpc.Channel, pb_grpc.AdminStub]:
    from fedlink.client.config import ClientConfig
    from fedlink.client.connection import open_channel

    assert config.cert and config.key and config.ca
    creds = load_credentials(config.cert, config.key, config.ca, role="admin")
    client = ClientConfig(
        server=config.server,
        server_name=config.server_name,
        cert=config.cert,
        key=config.key,
        ca=config.ca,
    )
    channel = open_channel(client, creds)
    return channel, pb_grpc.AdminStub(channel)


def _failed(config: AdminConfig, error: grpc.RpcError) -> int:
    print(f"{config.server}: {error.code().name}: {error.details()}", file=sys.stderr)
    return EXIT_FAILED


def _run_status(args: argparse.Namespace) -> int:
    config = _config(args)
    channel, stub = _stub(config)
    interrupted = threading.Event()
    if config.watch:
        # Ctrl-C ends the watch between two calls, cleanly: a KeyboardInterrupt raised inside a
        # gRPC call can leave the channel's close waiting for ever (grpc/grpc#19973 and later
        # reports; a test saw `status --watch` outlive its SIGINT by 30 s).
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    with channel:
        while True:
            try:
                reply = stub.GetStatus(
                    pb.GetStatusRequest(max_log_lines=config.log_lines),
                    timeout=config.timeout_seconds,
                )
            except grpc.RpcError as error:
                if not config.watch:
                    return _failed(config, error)
                _failed(config, error)
            else:
                status = json_format.MessageToDict(
                    reply,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
                if config.json:
                    print(json.dumps(status, sort_keys=True), flush=True)
                else:
                    if config.watch and sys.stdout.isatty():
                        print("\x1b[H\x1b[2J", end="")
                    print(format_status(status), flush=True)
            if not config.watch or interrupted.wait(config.interval_seconds):
                return 0


def _run_stop(args: argparse.Namespace) -> int:
    config = _config(args)
    channel, stub = _stub(config)
    with channel:
        try:
            stub.StopRun(pb.StopRunRequest(reason=args.reason), timeout=config.timeout_seconds)
        except grpc.RpcError as error:
            return _failed(config, error)
    print(
        f"{config.server}: the coordinator is stopping; start it again on its state_dir to resume"
    )
    return 0


def _run_exclude(args: argparse.Namespace) -> int:
    config = _config(args)
    channel, stub = _stub(config)
    with channel:
        try:
            reply = stub.ExcludeClient(
                pb.ExcludeClientRequest(identity=args.client, reason=args.reason),
                timeout=config.timeout_seconds,
            )
        except grpc.RpcError as error:
            return _failed(config, error)
    already = " (it already was)" if reply.already_excluded else ""
    print(f"{config.server}: {args.client} is excluded for the rest of the run{already}")
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The status as people read it: a summary line, a client table, the recent log lines."""
    now = float(status.get("updated_unix", 0.0)) or time.time()
    phase = status.get("phase") or "-"
    lines = [
        f"state: {status['state']}   round {status['round']} of {status['num_rounds']} "
        f"({status['completed_rounds']} completed)   phase: {phase}"
    ]
    if status.get("phase"):
        left = max(0.0, float(status["deadline_unix"]) - now)
        lines[0] += (
            f"   results: {status['delivered']} (quorum {status['quorum']})   "
            f"deadline in {left:.0f} s"
        )
    if status["state"] == "waiting for clients":
        lines[0] += f"   needs {status['clients_needed']} client(s)"
    header = (
        "client",
        "connected",
        "last seen",
        "sampled",
        "down",
        "up",
        "last result",
        "last error",
    )
    rows = [header]
    for client in status.get("clients", []):
        name = client["identity"] + (" (excluded)" if client.get("excluded") else "")
        rows.append(
            (
                name,
                "yes" if client.get("connected") else "no",
                _ago(float(client.get("last_seen_unix", 0.0)), now),
                "yes" if client.get("sampled") else "",
                _size(int(client.get("bytes_down", 0))),
                _size(int(client.get("bytes_up", 0))),
                client.get("last_result", ""),
                client.get("last_error", ""),
            )
        )
    lines.append("")
    if len(rows) == 1:
        lines.append("no client has joined yet")
    else:
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    log = status.get("log", [])
    if log:
        lines.append("")
        for entry in log:
            when = dt.datetime.fromtimestamp(float(entry["time_unix"]), dt.timezone.utc)
            lines.append(
                f"{when:%H:%M:%S} {entry['level']:<7} {entry['logger']}: {entry['message']}"
            )
    return "\n".join(lines)


def _ago(unix: float, now: float) -> str:
    if unix <= 0:
        return "never"
    seconds = max(0.0, now - unix)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1 << 20:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1 << 20):.1f} MiB"
