"""`fedlink health`: ask a coordinator's gRPC health service (grpc.health.v1) over mutual TLS.

Exit status 0 means SERVING, 1 anything else (not serving, unreachable, refused), which is what
container healthchecks and service monitors expect. The coordinator requires a client
certificate on every connection, so the check presents one: a site's own bundle, or on the
coordinator's machine a certificate issued for the check (compose issues `healthcheck`).

Settings come from flags, `FEDLINK_HEALTH_*` variables or a TOML file, like `fedlink client`'s;
the prefix keeps them apart from the `FEDLINK_*` settings of the process being checked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlink.common.config import ENV_PREFIX, add_config_arguments, load_config
from fedlink.common.errors import ConfigError

ENV_PREFIX_HEALTH = ENV_PREFIX + "HEALTH_"
EXIT_UNHEALTHY = 1


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class HealthConfig:
    server: str = field(default="127.0.0.1:50051", metadata=_help("coordinator host:port"))
    server_name: str | None = field(
        default=None,
        metadata=_help(
            "expected name in the server certificate, when it differs from the host in --server"
        ),
    )
    cert: Path | None = field(default=None, metadata=_help("client certificate to present (PEM)"))
    key: Path | None = field(default=None, metadata=_help("its private key (PEM)"))
    ca: Path | None = field(default=None, metadata=_help("federation CA certificate"))
    service: str = field(
        default="", metadata=_help("service to ask about (empty = the coordinator as a whole)")
    )
    timeout_seconds: float = field(default=5.0, metadata=_help("give up after this long"))

    def __post_init__(self) -> None:
        if not (self.cert and self.key and self.ca):
            raise ConfigError(
                "the coordinator requires a client certificate: pass --cert, --key and --ca "
                f"(or {ENV_PREFIX_HEALTH}CERT, _KEY, _CA), e.g. a site's bundle from "
                "`fedlink certs issue --client`"
            )
        if not self.timeout_seconds > 0:  # also refuses NaN
            raise ConfigError("timeout_seconds must be positive")


def add_health_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = subparsers.add_parser(
        "health",
        help="check that a coordinator is serving (exit 0) over mutual TLS",
        description=(
            "Ask the coordinator's grpc.health.v1 service whether it is serving. Exit status 0: "
            f"SERVING; 1: anything else. Every flag can also be set as {ENV_PREFIX_HEALTH}<NAME>."
        ),
    )
    add_config_arguments(health, HealthConfig)
    health.set_defaults(func=_run_health)


def _run_health(args: argparse.Namespace) -> int:
    config = load_config(
        HealthConfig, path=args.config, overrides=vars(args), env_prefix=ENV_PREFIX_HEALTH
    )
    status = check_health(config)
    print(f"{config.server}: {status}")
    return 0 if status == "SERVING" else EXIT_UNHEALTHY


def check_health(config: HealthConfig) -> str:
    """The coordinator's health status name (SERVING, NOT_SERVING, ...) or the gRPC error."""
    from fedlink.client.config import ClientConfig
    from fedlink.client.connection import open_channel, trust_problem

    # The same channel a client opens: same certificate checks, same server-name handling.
    client = ClientConfig(
        server=config.server,
        server_name=config.server_name,
        cert=config.cert,
        key=config.key,
        ca=config.ca,
    )
    with open_channel(client) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=config.service),
                timeout=config.timeout_seconds,
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                problem = trust_problem(client, timeout=config.timeout_seconds)
                if problem is not None:  # the client's message, not OpenSSL's text
                    return problem
            return f"{error.code().name}: {error.details()}"
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name
