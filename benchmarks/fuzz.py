"""Fuzz benchmark: the hostile cases of tests/fuzzing.py, many more of them, against a real
`fedlink server` process.

    .venv/bin/python benchmarks/fuzz.py                    # 2,000 cases per family
    .venv/bin/python benchmarks/fuzz.py --cases 20000      # a long run

It issues a CA and certificates, starts `fedlink server` (task digits, mutual TLS on 127.0.0.1,
an allow-list naming only the fuzzing client, rate limits raised so they do not interfere) and
lets one client drive a single-client round that is repeated while everything it sends is
refused: malformed protobuf bytes, broken chunk sequences, crafted safetensors documents, finite
but extreme values, stale task ids, random requests from a CA-signed client that is not on the
allow-list, health Watch streams held open (by that outsider and beyond the per-client limit),
and TCP connections that never complete a TLS handshake (counted per connection). After each
family the coordinator process must be alive, its health service SERVING and the global model's
digest unchanged; every case must end in one of its family's refusal statuses within 30 s.
Finally an honest update is accepted, the one-round run finishes with exit status 0, and its
final model is exactly that update.

Prints a table (family, cases, statuses, cases per second) and the coordinator's resident
memory at start and end, and writes JSON (default benchmarks/results/fuzz.json). Exits 1 on any
failure, with the hypothesis example that caused it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import hypothesis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlink.common.pki import init_ca, issue_certificate
from fedlink.common.tensors import open_state_file

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))  # the case families live with the tests
from fuzzing import FAMILIES, FuzzClient, ServerFailure, honest_payload, upload  # noqa: E402

DEFAULT_OUT = BENCH_DIR / "results" / "fuzz.json"


def issue(directory: Path) -> dict[str, Path]:
    init_ca(directory / "ca")
    issue_certificate(
        directory / "ca", directory / "server", "server", role="server", hosts=["127.0.0.1"]
    )
    for name in ("fuzzer", "outsider"):
        issue_certificate(directory / "ca", directory / name, name, role="client")
    return {"ca": directory / "ca" / "ca.pem", "root": directory}


def channel(directory: Path, name: str, address: str) -> grpc.Channel:
    bundle = directory / name
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(bundle / "ca.pem").read_bytes(),
        private_key=(bundle / f"{name}.key").read_bytes(),
        certificate_chain=(bundle / f"{name}.pem").read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def start_server(work: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    server = work / "certs" / "server"
    arguments = [
        sys.executable,
        "-m",
        "fedlink",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--address-file",
        str(work / "address"),
        "--cert",
        str(server / "server.pem"),
        "--key",
        str(server / "server.key"),
        "--ca",
        str(server / "ca.pem"),
        "--task",
        "digits",
        "--num-rounds",
        "1",
        "--min-clients",
        "1",
        "--min-fit-clients",
        "1",
        "--evaluate-every",
        "0",
        "--max-round-retries",
        str(10**9),
        "--round-timeout-seconds",
        "120",
        "--max-num-examples",
        "1000",
        "--allowed-clients",
        "fuzzer",
        "--rate-limit-per-second",
        "1e6",
        "--rate-limit-burst",
        str(10**6),
        "--run-dir",
        str(work / "run"),
        "--state-dir",
        str(work / "state"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(arguments, stdout=out, stderr=subprocess.STDOUT, env=environment)
    deadline = time.monotonic() + 120
    address_file = work / "address"
    while not (address_file.exists() and address_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the coordinator did not start; see {log}")
        time.sleep(0.1)
    return process, address_file.read_text().strip()


def rss_bytes(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def check_alive(process: subprocess.Popen[bytes], probe: grpc.Channel, client: FuzzClient) -> None:
    if process.poll() is not None:
        raise ServerFailure(f"the coordinator exited with status {process.returncode}")
    reply = health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise ServerFailure("the coordinator's health service is not SERVING")
    client.task()  # raises ServerFailure if the global model changed


def run_family(name: str, client: FuzzClient, cases: int, seed: int) -> float:
    case = FAMILIES[name]

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.seed(seed)
    @given(data=st.data())
    def family(data: st.DataObject) -> None:
        case(client, data)

    started = time.monotonic()
    family()
    return time.monotonic() - started


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'family':<12} {'cases':>7} {'cases/s':>8} {'RSS MiB':>8}  statuses",
        "-" * 90,
    ]
    for row in rows:
        statuses = ", ".join(f"{code} {count}" for code, count in sorted(row["statuses"].items()))
        rss = row["rss_after_bytes"] / 2**20
        lines.append(
            f"{row['family']:<12} {row['cases']:>7} {row['cases_per_second']:>8.0f} "
            f"{rss:>8.0f}  {statuses}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases per family")
    parser.add_argument(
        "--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="NAME"
    )
    parser.add_argument("--seed", type=int, default=int(time.time()), help="hypothesis seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedlink-fuzz-") as tmp:
        work = Path(tmp)
        issue(work / "certs")
        log = work / "server.log"
        process, address = start_server(work, log)
        rows: list[dict[str, Any]] = []
        failure: str | None = None
        memory_start: dict[str, int] = {}
        memory_end: dict[str, int] = {}
        try:
            client = FuzzClient(
                channel(work / "certs", "fuzzer", address),
                channel(work / "certs", "outsider", address),
                address,
            )
            probe = channel(work / "certs", "fuzzer", address)
            client.join()
            client.task()
            memory_start = rss_bytes(process.pid)
            for name in args.families:
                before = collections.Counter(
                    {k: v for k, v in client.outcomes.items() if k[0] == name}
                )
                seconds = run_family(name, client, args.cases, args.seed)
                check_alive(process, probe, client)
                statuses = {
                    code: count - before[(family, code)]
                    for (family, code), count in client.outcomes.items()
                    if family == name
                }
                total = sum(statuses.values())
                rows.append(
                    {
                        "family": name,
                        "cases": total,
                        "seconds": round(seconds, 2),
                        "cases_per_second": total / seconds if seconds else 0.0,
                        "rss_after_bytes": rss_bytes(process.pid)["VmRSS"],
                        "statuses": statuses,
                    }
                )
                print(f"{name}: {total} cases in {seconds:.1f}s", flush=True)
            memory_end = rss_bytes(process.pid)
            honest = honest_payload(client)
            accepted = client.send("honest", upload(client.task(), honest), [grpc.StatusCode.OK])
            assert accepted == grpc.StatusCode.OK
            exit_status = process.wait(timeout=120)
            if exit_status != 0:
                raise ServerFailure(f"the run ended with exit status {exit_status}")
            with open_state_file(work / "run" / "final_model.safetensors") as final:
                expected = client.honest_state()
                if final.keys() != expected.keys() or any(
                    not bool((final[k] == v).all()) for k, v in expected.items()
                ):
                    raise ServerFailure("the final model is not the one honest update")
        except (ServerFailure, AssertionError, grpc.RpcError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
            print(f"FAILURE: {failure}\n--- coordinator log (tail) ---", file=sys.stderr)
            print("\n".join(log.read_text().splitlines()[-40:]), file=sys.stderr)
            memory_end = rss_bytes(process.pid) if process.poll() is None else {}
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    total = sum(row["cases"] for row in rows)
    print()
    print(format_table(rows))
    print(f"\ntotal: {total} hostile cases, {'FAILED' if failure else 'all refused'}")
    for key in ("VmRSS", "VmHWM"):
        start, end = memory_start.get(key), memory_end.get(key)
        if start is not None and end is not None:
            print(f"coordinator {key}: {start / 2**20:.0f} MiB -> {end / 2**20:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "cases_per_family": args.cases,
                "seed": args.seed,
                "total_cases": total,
                "failure": failure,
                "families": rows,
                "coordinator_memory_start": memory_start,
                "coordinator_memory_end": memory_end,
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
