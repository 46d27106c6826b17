"""The `fedlink` command: server, client, simulate, certs, health, status, admin and demo
subcommands."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from fedlink import __version__
from fedlink.certs import add_certs_parser
from fedlink.common.config import add_config_arguments, load_config
from fedlink.common.errors import FedlinkError
from fedlink.common.logs import configure_logging
from fedlink.health import add_health_parser
from fedlink.status import add_admin_parsers


def _run_server(args: argparse.Namespace) -> int:
    from fedlink.server.app import run_server
    from fedlink.server.config import ServerConfig

    config = load_config(ServerConfig, path=args.config, overrides=vars(args))
    configure_logging(verbose=args.verbose, log_format=config.log_format)
    return run_server(config)


def _run_client(args: argparse.Namespace) -> int:
    from fedlink.client.app import run_client
    from fedlink.client.config import ClientConfig

    config = load_config(ClientConfig, path=args.config, overrides=vars(args))
    configure_logging(verbose=args.verbose, log_format=config.log_format)
    return run_client(config)


def _run_simulation(args: argparse.Namespace) -> int:
    from fedlink.simulation.app import run_simulation
    from fedlink.simulation.config import SimulationConfig

    config = load_config(SimulationConfig, path=args.config, overrides=vars(args))
    configure_logging(verbose=args.verbose, log_format=config.log_format)
    return run_simulation(config)


def _run_demo(args: argparse.Namespace) -> int:
    from fedlink.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from fedlink.client.config import ClientConfig
    from fedlink.demo import add_demo_arguments
    from fedlink.server.config import ServerConfig
    from fedlink.simulation.config import SimulationConfig

    parser = argparse.ArgumentParser(
        prog="fedlink", description="Federated learning over mutual TLS."
    )
    parser.add_argument("--version", action="version", version=f"fedlink {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    server = commands.add_parser("server", help="run the coordinator")
    add_config_arguments(server, ServerConfig)
    server.set_defaults(func=_run_server)

    client = commands.add_parser("client", help="run a client on this site's data")
    add_config_arguments(client, ClientConfig)
    client.set_defaults(func=_run_client)

    simulate = commands.add_parser(
        "simulate", help="a federation of N virtual clients in this process (no network)"
    )
    add_config_arguments(simulate, SimulationConfig)
    simulate.set_defaults(func=_run_simulation)

    add_certs_parser(commands)
    add_health_parser(commands)
    add_admin_parsers(commands)

    demo = commands.add_parser("demo", help="certificates + coordinator + N clients on localhost")
    add_demo_arguments(demo)
    demo.set_defaults(func=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        code: int = args.func(args)
    except FedlinkError as exc:
        logging.getLogger("fedlink").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
