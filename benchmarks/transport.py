"""Transport benchmark: fedlink round time and coordinator memory vs the bare gRPC wire limit.

    .venv/bin/python benchmarks/transport.py                      # the whole matrix
    .venv/bin/python benchmarks/transport.py --models cnn1.66m --clients 2

For each model (cnn1.66m: the FedAvg CNN, 1.66M parameters; resnet18: torchvision ResNet-18,
11.2M; 100m: 100M float32 parameters; 1gib: 275M, 1.02 GiB) and each number of clients, it starts a real coordinator
and N client processes over mutual TLS on 127.0.0.1, exactly as `fedlink demo` does, with
training replaced by a no-op (benchmarks/noop_task.py): each round still streams the global
model to every client, which loads it, serializes its state_dict and streams it back, and the
coordinator validates and aggregates every update. It reports the mean seconds of the rounds
after the first (metrics.jsonl) and the coordinator's peak RSS (getrusage of the process).

In the same run it measures the wire limit (benchmarks/bare_wire.py): the same payload, down
then up, for the same number of concurrent client processes, through bare mTLS gRPC streaming
calls with raw-bytes messages of the same chunk size and fedlink's channel options; clients
connect first and are released together, so start-up is not timed. ratio = round / wire.

Targets (from the issues): ratio <= 1.3 for resnet18 and 100m with 10 clients; with 10 clients
and the 100m model the coordinator's peak RSS < 3 x model size + 1 GiB, and no growth with the
number of clients; the 1gib model with one client at >= 70% of a bare stream's rate (wire /
round >= 0.70, the large-model issue's target).

Besides wall time it reports CPU seconds per round (server and clients, user and system, from
/proc at round boundaries) for fedlink and for the wire limit: on a machine where the clients
and the coordinator share the cores, the round time follows the CPU work. It also measures how
much CPU *other* processes used meanwhile and warns when the machine was not quiet.

Prints a table and writes JSON (default benchmarks/results/transport.json). The default matrix
takes about 8 minutes on 2 cores; 100m with 10 clients needs about 12 GB of RAM.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import IO, Any

# Deliberately no torch (nor anything heavy) in this process: Linux counts a parent's RSS at
# fork time in its child's ru_maxrss, so a lean driver keeps the children's peaks honest.
from fedlink.common.pki import init_ca, issue_certificate
from fedlink.common.wire import DEFAULT_CHUNK_SIZE

BENCH_DIR = Path(__file__).resolve().parent

# The models of noop_task.py (kept in step with its MODELS), chosen by MODEL_ENV.
MODELS = ("cnn1.66m", "resnet18", "100m", "1gib")
# The default matrix; 1gib is run on its own with one client (`--models 1gib --clients 1`):
# each process holds a few copies of the model.
DEFAULT_MODELS = MODELS[:3]
MODEL_ENV = "FEDLINK_BENCH_MODEL"
TRAIN_SECONDS_ENV = "FEDLINK_BENCH_TRAIN_SECONDS"  # noop_task.py's
DEFAULT_CLIENTS = (2, 5, 10)
DEFAULT_OUT = BENCH_DIR / "results" / "transport.json"
TASK = "noop_task"
MIB = 1 << 20
TARGET_RATIO = 1.3
RATIO_TARGET_MODELS = ("resnet18", "100m")
# Large models (issue 17): one client moves a 1 GiB+ model at >= 70% of one bare stream's rate.
STREAM_TARGET_MODEL = "1gib"
STREAM_TARGET_SHARE = 0.70
TARGET_CLIENTS = 10
MEMORY_TARGET_MODEL = "100m"
# Warn when other processes took more than this share of the CPUs during a measurement.
INTERFERENCE_WARNING = 0.10
# Coordinator memory counts as "independent of the number of clients" below this growth.
GROWTH_PER_CLIENT_MIB = 16.0
STARTUP_TIMEOUT_SECONDS = 180.0
CLIENT_EXIT_SECONDS = 60.0
DEFAULT_ROUNDS = 3
# Repetitions of the (cheap) wire measurement; the first is a warm-up, as fedlink's round 1.
MIN_WIRE_REPEATS = 4


def memory_limit_bytes(payload_bytes: int) -> int:
    """The issue's bound on the coordinator's peak memory: 3 x model size + 1 GiB."""
    return 3 * payload_bytes + 1024 * MIB


# ---- processes -------------------------------------------------------------------------------


class Processes:
    """Every child process this benchmark starts; `kill_all` leaves none behind."""

    def __init__(self) -> None:
        self._all: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        command: list[str],
        log_path: Path,
        env: dict[str, str],
        cwd: Path,
        *,
        pipes: bool = False,
    ) -> subprocess.Popen[bytes]:
        log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (owned by the child process)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                env=env,
                cwd=cwd,
            )
        finally:
            log.close()
        self._all.append(process)
        return process

    def kill_all(self) -> None:
        for process in self._all:
            if process.returncode is None:
                with suppress(ProcessLookupError):
                    process.kill()
        for process in self._all:
            if process.returncode is None:
                with suppress(TimeoutError):
                    reap(process, time.monotonic() + 10.0)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with suppress(OSError):
                        stream.close()
        self._all.clear()


@dataclass(frozen=True)
class Exit:
    returncode: int
    peak_rss_bytes: int


def try_reap(process: subprocess.Popen[bytes]) -> Exit | None:
    """Reap `process` with os.wait4 (for its peak RSS) if it has exited; never blocks."""
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid != process.pid:
        return None
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code  # reaped here; Popen must not wait for it again
    return Exit(code, usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux


def reap(process: subprocess.Popen[bytes], deadline: float) -> Exit:
    """Wait for `process` until `deadline` (monotonic)."""
    while True:
        result = try_reap(process)
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {process.pid} ({process.args!r}) did not exit in time")
        time.sleep(0.05)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    """CPU seconds (user, system) of the server and of all clients together, and of everything
    else on the machine in the same interval (other processes, kernel threads): the benchmark
    assumes a quiet machine, and `other` shows when it was not."""

    server_user: float = 0.0
    server_sys: float = 0.0
    clients_user: float = 0.0
    clients_sys: float = 0.0
    other: float = 0.0

    def __sub__(self, earlier: Cpu) -> Cpu:
        return Cpu(
            *(getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(Cpu))
        )

    @property
    def ours(self) -> float:
        return self.server_user + self.server_sys + self.clients_user + self.clients_sys


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a live process has used so far; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def sample_cpu(server: subprocess.Popen[bytes], clients: Sequence[subprocess.Popen[bytes]]) -> Cpu:
    machine = machine_busy_seconds()
    server_user, server_sys = process_cpu(server.pid)
    per_client = [process_cpu(c.pid) for c in clients]
    clients_user = sum(user for user, _ in per_client)
    clients_sys = sum(system for _, system in per_client)
    ours = server_user + server_sys + clients_user + clients_sys
    return Cpu(server_user, server_sys, clients_user, clients_sys, machine - ours)


def child_env(model: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": str(BENCH_DIR) + (os.pathsep + path if path else ""),
        # As `fedlink demo`: one math thread per process on a shared machine.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        MODEL_ENV: model,
    }


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f}s")


class MemoryMonitor:
    """Samples the machine's used memory (MemTotal - MemAvailable) in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meminfo", daemon=True)
        self.peak_bytes = 0

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, used_memory_bytes())
            if self._stop.wait(self._interval):
                return


def used_memory_bytes() -> int:
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


# ---- certificates and models -----------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    cert: Path
    key: Path
    ca: Path

    def args(self) -> list[str]:
        return ["--cert", str(self.cert), "--key", str(self.key), "--ca", str(self.ca)]


@dataclass(frozen=True)
class Certificates:
    server: Bundle
    clients: tuple[Bundle, ...]


def make_certificates(directory: Path, num_clients: int) -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and N client bundles (as `fedlink demo`)."""
    ca_dir = directory / "ca"
    init_ca(ca_dir)
    issue_certificate(
        ca_dir, directory / "server", "server", role="server", hosts=["localhost", "127.0.0.1"]
    )
    clients = []
    for index in range(num_clients):
        name = f"client-{index + 1}"
        issue_certificate(ca_dir, directory / name, name, role="client")
        bundle = directory / name
        clients.append(Bundle(bundle / f"{name}.pem", bundle / f"{name}.key", bundle / "ca.pem"))
    server = directory / "server"
    return Certificates(
        Bundle(server / "server.pem", server / "server.key", server / "ca.pem"), tuple(clients)
    )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    parameters: int
    payload_bytes: int  # the safetensors encoding fedlink streams
    num_examples: int  # each noop client's FedAvg weight


def model_info(name: str) -> tuple[ModelInfo, str]:
    """The model's size, measured in a child process (see the note on imports); also returns
    the torch version."""
    output = subprocess.run(
        [sys.executable, str(BENCH_DIR / "noop_task.py"), name],
        env=child_env(name),
        capture_output=True,
        check=True,
        timeout=STARTUP_TIMEOUT_SECONDS,
    ).stdout
    info = json.loads(output)
    return ModelInfo(
        name, int(info["parameters"]), int(info["payload_bytes"]), int(info["num_examples"])
    ), str(info["torch"])


# ---- one fedlink federation ------------------------------------------------------------------


@dataclass
class FedlinkRun:
    round_seconds: list[float] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    server_peak_rss_bytes: int = 0  # ru_maxrss from wait4
    server_vmhwm_bytes: int = 0  # VmHWM from /proc, last sample before exit (a cross-check)
    client_peak_rss_bytes: int = 0
    system_peak_used_bytes: int = 0
    wall_seconds: float = 0.0
    # CPU used between the ends of consecutive rounds (rounds 2..R), sampled from /proc.
    round_cpu: list[Cpu] = field(default_factory=list)
    # When each round's metrics row appeared (time.time(), to within the 20 ms polling), to
    # place the coordinator's log lines within rounds.
    round_ended_at: list[float] = field(default_factory=list)
    error: str | None = None


def run_fedlink(
    info: ModelInfo,
    num_clients: int,
    rounds: int,
    certs: Certificates,
    work: Path,
    timeout: float,
    processes: Processes,
    verbose: bool = False,
    server_args: Sequence[str] = (),
    check_bytes: bool = True,
    train_spread: float = 0.0,
) -> FedlinkRun:
    """One federation of `num_clients` noop clients; `server_args` are extra coordinator flags.
    `check_bytes` requires every round to move exactly the model down and up per client (true
    of plaintext FedAvg, not of secure aggregation's extra messages and masked vectors).
    `train_spread`: client k of N "trains" (sleeps) k/N of this many seconds a round."""
    result = FedlinkRun()
    log_flags = ["--verbose"] if verbose else []
    run_dir = work / "run"
    logs = work / "logs"
    for directory in (run_dir, logs):
        directory.mkdir(parents=True)
    env = child_env(info.name)
    address_file = work / "server.address"
    started = time.monotonic()
    deadline = started + timeout
    server = processes.spawn(
        [
            sys.executable,
            "-m",
            "fedlink",
            *log_flags,
            "server",
            "--listen",
            "127.0.0.1:0",
            "--address-file",
            str(address_file),
            *certs.server.args(),
            "--task",
            TASK,
            "--num-rounds",
            str(rounds),
            "--min-clients",
            str(num_clients),
            "--min-fit-clients",
            str(num_clients),
            "--evaluate-every",
            "0",
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(work / "state"),
            *server_args,
        ],
        logs / "server.log",
        env,
        work,
    )
    clients: list[subprocess.Popen[bytes]] = []
    with MemoryMonitor() as memory:
        try:
            address = wait_for_file(address_file, server, STARTUP_TIMEOUT_SECONDS)
            for index in range(num_clients):
                spool = work / f"spool-{index + 1}"
                spool.mkdir()
                clients.append(
                    processes.spawn(
                        [
                            sys.executable,
                            "-m",
                            "fedlink",
                            *log_flags,
                            "client",
                            "--server",
                            address,
                            *certs.clients[index].args(),
                            "--task",
                            TASK,
                            "--device",
                            "cpu",
                            "--spool-dir",
                            str(spool),
                        ],
                        logs / f"client-{index + 1}.log",
                        {**env, TRAIN_SECONDS_ENV: str(train_spread * index / num_clients)},
                        work,
                    )
                )
            server_exit = follow_rounds(
                server, clients, run_dir / "metrics.jsonl", deadline, result
            )
            client_exits = [reap(c, time.monotonic() + CLIENT_EXIT_SECONDS) for c in clients]
        except (TimeoutError, RuntimeError) as exc:
            result.error = str(exc)
            processes.kill_all()
            return result
        finally:
            result.wall_seconds = time.monotonic() - started
    result.system_peak_used_bytes = memory.peak_bytes
    result.server_peak_rss_bytes = server_exit.peak_rss_bytes
    result.client_peak_rss_bytes = max(e.peak_rss_bytes for e in client_exits)
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        result.round_seconds.append(float(record["seconds"]))
        result.bytes_down.append(int(record["bytes_down"]))
        result.bytes_up.append(int(record["bytes_up"]))
    failed = [e.returncode for e in [server_exit, *client_exits] if e.returncode != 0]
    if failed or len(result.round_seconds) < rounds:
        result.error = (
            f"federation failed: server exit {server_exit.returncode}, client exits "
            f"{[e.returncode for e in client_exits]}, {len(result.round_seconds)} of {rounds} "
            f"rounds; see {logs}"
        )
    expected = num_clients * info.payload_bytes
    if (
        check_bytes
        and not result.error
        and any(
            d != expected or u != expected
            for d, u in zip(result.bytes_down, result.bytes_up, strict=True)
        )
    ):
        result.error = f"bytes moved per round differ from {expected}: {result.bytes_down}"
    return result


def follow_rounds(
    server: subprocess.Popen[bytes],
    clients: Sequence[subprocess.Popen[bytes]],
    metrics: Path,
    deadline: float,
    result: FedlinkRun,
) -> Exit:
    """Wait for the coordinator to exit, sampling everyone's CPU time as each round ends."""
    rounds_seen = 0
    previous: Cpu | None = None
    while True:
        result.server_vmhwm_bytes = max(result.server_vmhwm_bytes, vm_hwm_bytes(server.pid))
        exited = try_reap(server)
        if exited is not None:
            return exited
        if metrics.exists():
            rounds = metrics.read_bytes().count(b"\n")
            if rounds > rounds_seen:
                cpu = sample_cpu(server, clients)
                if previous is not None and rounds == rounds_seen + 1:
                    result.round_cpu.append(cpu - previous)
                result.round_ended_at.extend([time.time()] * (rounds - rounds_seen))
                previous, rounds_seen = cpu, rounds
        if time.monotonic() > deadline:
            raise TimeoutError("the federation did not finish in time")
        time.sleep(0.02)


def vm_hwm_bytes(pid: int) -> int:
    """The process's peak resident set so far (VmHWM); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the wire limit ----------------------------------------------------------------------------


@dataclass
class WireRun:
    seconds: list[float] = field(default_factory=list)
    server_peak_rss_bytes: int = 0
    system_peak_used_bytes: int = 0
    cpu: list[Cpu] = field(default_factory=list)  # per repetition
    error: str | None = None


def run_wire(
    info: ModelInfo,
    num_clients: int,
    repeats: int,
    certs: Certificates,
    work: Path,
    timeout: float,
    processes: Processes,
    chunk_size: int,
) -> WireRun:
    result = WireRun()
    work.mkdir(parents=True)
    env = child_env(info.name)
    script = str(BENCH_DIR / "bare_wire.py")
    size = ["--size", str(info.payload_bytes), "--chunk-size", str(chunk_size)]
    port_file = work / "wire.address"
    deadline = time.monotonic() + timeout
    server = processes.spawn(
        [
            sys.executable,
            script,
            "server",
            "--port-file",
            str(port_file),
            *certs.server.args(),
            *size,
            "--lifetime",
            str(timeout),
        ],
        work / "wire-server.log",
        env,
        work,
    )
    # One queue per client: a fast client's next line must not be mistaken for this phase's.
    lines: list[queue.Queue[bytes]] = [queue.Queue() for _ in range(num_clients)]
    clients: list[subprocess.Popen[bytes]] = []

    def read_lines(index: int, stream: IO[bytes]) -> None:
        for line in stream:
            lines[index].put(line)
        lines[index].put(b"")  # end of output

    def collect(kind: str) -> list[bytes]:
        got: list[bytes] = []
        for index in range(num_clients):
            remaining = deadline - time.monotonic()
            try:
                line = lines[index].get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise TimeoutError(f"wire client {index + 1}: waited too long for {kind}") from None
            if not line:
                raise RuntimeError(f"wire client {index + 1} exited early; see {work}")
            got.append(line)
        return got

    with MemoryMonitor() as memory:
        try:
            address = wait_for_file(port_file, server, STARTUP_TIMEOUT_SECONDS)
            for index in range(num_clients):
                client = processes.spawn(
                    [
                        sys.executable,
                        script,
                        "client",
                        "--server",
                        address,
                        *certs.clients[index].args(),
                        *size,
                        "--repeats",
                        str(repeats),
                        "--call-timeout",
                        str(timeout),
                    ],
                    work / f"wire-client-{index + 1}.log",
                    env,
                    work,
                    pipes=True,
                )
                assert client.stdout is not None
                threading.Thread(
                    target=read_lines, args=(index, client.stdout), daemon=True
                ).start()
                clients.append(client)
            for _ in range(repeats):
                collect("ready")
                before = sample_cpu(server, clients)
                started = time.monotonic()
                for client in clients:
                    assert client.stdin is not None
                    client.stdin.write(b"go\n")
                    client.stdin.flush()
                reports = [json.loads(line) for line in collect("results")]
                result.seconds.append(time.monotonic() - started)
                result.cpu.append(sample_cpu(server, clients) - before)
                for report in reports:
                    if report["bytes_down"] != info.payload_bytes or (
                        report["bytes_up"] != info.payload_bytes
                    ):
                        raise RuntimeError(f"wire client moved the wrong byte count: {report}")
            for client in clients:
                reap(client, time.monotonic() + CLIENT_EXIT_SECONDS)
            server.send_signal(signal.SIGTERM)
            result.server_peak_rss_bytes = reap(server, time.monotonic() + 30).peak_rss_bytes
        except (TimeoutError, RuntimeError, OSError, ValueError) as exc:
            result.error = str(exc)
        finally:
            processes.kill_all()
    result.system_peak_used_bytes = memory.peak_bytes
    return result


# ---- the matrix --------------------------------------------------------------------------------


def after_first(values: Sequence[float]) -> float:
    """Mean of the values after the first (warm-up); the only value when there is one."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def mean_cpu(samples: Sequence[Cpu]) -> Cpu:
    return Cpu(
        *(statistics.fmean(getattr(c, f.name) for c in samples) for f in dataclasses.fields(Cpu))
    )


def wait_for_quiet(max_wait: float, window: float = 1.0, needed: int = 3) -> None:
    """Wait until other processes leave the CPUs alone (`needed` quiet windows in a row), or
    `max_wait` seconds pass. Between cases none of the benchmark's processes run, so whatever
    the machine is busy with is someone else's."""
    deadline = time.monotonic() + max_wait
    cpus = os.cpu_count() or 1
    quiet = 0
    announced = False
    while quiet < needed and time.monotonic() < deadline:
        before = machine_busy_seconds()
        time.sleep(window)
        share = (machine_busy_seconds() - before) / (window * cpus)
        if share <= INTERFERENCE_WARNING:
            quiet += 1
            continue
        quiet = 0
        if not announced:
            print(
                f"    waiting for a quiet machine (others use {share:.0%} of the CPUs)", flush=True
            )
            announced = True
    if quiet < needed:
        print("    the machine is still busy; measuring anyway", flush=True)


def busy_share(cpu: Cpu | None, seconds: float | None) -> float | None:
    """The share of all CPUs that other processes used over `seconds` of wall time."""
    if cpu is None or not seconds:
        return None
    return max(cpu.other, 0.0) / (seconds * (os.cpu_count() or 1))


def run_case(
    info: ModelInfo,
    num_clients: int,
    rounds: int,
    certs: Certificates,
    work: Path,
    timeout: float,
    chunk_size: int,
    verbose: bool = False,
    train_spread: float = 0.0,
) -> dict[str, Any]:
    processes = Processes()
    try:
        print(f"  {info.name} x {num_clients} clients: fedlink, {rounds} rounds ...", flush=True)
        fed = run_fedlink(
            info,
            num_clients,
            rounds,
            certs,
            work / "fedlink",
            timeout,
            processes,
            verbose,
            train_spread=train_spread,
        )
        if fed.error:
            print(f"    fedlink FAILED: {fed.error}", flush=True)
        else:
            print(f"    rounds (s): {', '.join(f'{s:.2f}' for s in fed.round_seconds)}", flush=True)
        print(f"  {info.name} x {num_clients} clients: wire limit ...", flush=True)
        wire = run_wire(
            info,
            num_clients,
            max(rounds, MIN_WIRE_REPEATS),
            certs,
            work / "wire",
            timeout,
            processes,
            chunk_size,
        )
        if wire.error:
            print(f"    wire FAILED: {wire.error}", flush=True)
        else:
            print(f"    wire (s): {', '.join(f'{s:.2f}' for s in wire.seconds)}", flush=True)
    finally:
        processes.kill_all()
    round_s = after_first(fed.round_seconds) if fed.round_seconds else None
    wire_s = after_first(wire.seconds) if wire.seconds else None
    # fedlink's round_cpu already starts at round 2.
    round_cpu = mean_cpu(fed.round_cpu) if fed.round_cpu else None
    wire_cpu = mean_cpu(wire.cpu[1:] or wire.cpu) if wire.cpu else None
    limit = memory_limit_bytes(info.payload_bytes)
    interference = {
        "fedlink": busy_share(round_cpu, round_s),
        "wire": busy_share(wire_cpu, wire_s),
    }
    for name, share in interference.items():
        if share is not None and share > INTERFERENCE_WARNING:
            print(
                f"    WARNING: other processes used {share:.0%} of the machine's CPU during the "
                f"{name} measurement; its timings are not reliable",
                flush=True,
            )
    return {
        "model": info.name,
        "parameters": info.parameters,
        "payload_bytes": info.payload_bytes,
        "clients": num_clients,
        "rounds": rounds,
        "train_spread_seconds": train_spread,
        "round_seconds": round_s,
        "wire_seconds": wire_s,
        "ratio": round_s / wire_s if round_s and wire_s else None,
        "round_cpu_seconds": dataclasses.asdict(round_cpu) if round_cpu else None,
        "wire_cpu_seconds": dataclasses.asdict(wire_cpu) if wire_cpu else None,
        "server_peak_rss_bytes": fed.server_peak_rss_bytes or None,
        "memory_limit_bytes": limit,
        "memory_ok": fed.server_peak_rss_bytes < limit if fed.server_peak_rss_bytes else None,
        # Share of the machine's CPU used by anything else while measuring (0 = quiet machine).
        "interference": interference,
        "fedlink": dataclasses.asdict(fed),
        "wire": dataclasses.asdict(wire),
    }


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on the rows that were run."""
    out: list[dict[str, Any]] = []
    rows = [row for row in rows if not row.get("train_spread_seconds")]  # rounds include sleeps
    for row in rows:
        if row["model"] == STREAM_TARGET_MODEL and row["clients"] == 1:
            ratio = row["ratio"]
            share = 1 / ratio if ratio else None
            out.append(
                {
                    "check": f"one client at >= {STREAM_TARGET_SHARE:.0%} of a bare stream's rate "
                    f"({row['model']})",
                    "value": share,
                    "passed": share is not None and share >= STREAM_TARGET_SHARE,
                }
            )
        if row["clients"] != TARGET_CLIENTS:
            continue
        if row["model"] in RATIO_TARGET_MODELS:
            ratio = row["ratio"]
            out.append(
                {
                    "check": f"round/wire ratio <= {TARGET_RATIO} ({row['model']}, "
                    f"{TARGET_CLIENTS} clients)",
                    "value": ratio,
                    "passed": ratio is not None and ratio <= TARGET_RATIO,
                }
            )
        if row["model"] == MEMORY_TARGET_MODEL:
            peak = row["server_peak_rss_bytes"]
            out.append(
                {
                    "check": f"coordinator peak RSS < 3 x model + 1 GiB = "
                    f"{row['memory_limit_bytes'] / MIB:.0f} MiB ({row['model']}, "
                    f"{TARGET_CLIENTS} clients)",
                    "value": peak / MIB if peak else None,
                    "passed": bool(row["memory_ok"]),
                }
            )
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["server_peak_rss_bytes"]:
            by_model.setdefault(row["model"], []).append(row)
    for model, model_rows in by_model.items():
        if len(model_rows) < 2:
            continue
        model_rows.sort(key=lambda r: r["clients"])
        low, high = model_rows[0], model_rows[-1]
        growth = (high["server_peak_rss_bytes"] - low["server_peak_rss_bytes"]) / MIB
        per_client = growth / (high["clients"] - low["clients"])
        out.append(
            {
                "check": f"coordinator memory independent of clients ({model}: "
                f"{low['clients']} -> {high['clients']} clients, "
                f"{growth:+.0f} MiB = {per_client:+.1f} MiB/client)",
                "value": growth,
                # Per-connection state (a thread, TLS and HTTP/2 buffers) is a few MiB.
                "passed": per_client < GROWTH_PER_CLIENT_MIB,
            }
        )
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (
        f"{'model':<9} {'params':>12} {'MiB':>7} {'clients':>7} {'round s':>8} {'wire s':>7} "
        f"{'ratio':>6} {'srv peak MiB':>12} {'limit MiB':>9} {'sys peak GiB':>12} "
        f"{'CPU s/round':>11} {'wire CPU s':>10} {'noise %':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        peak = row["server_peak_rss_bytes"]
        system = max(
            row["fedlink"]["system_peak_used_bytes"], row["wire"]["system_peak_used_bytes"]
        )
        lines.append(
            f"{row['model']:<9} {row['parameters']:>12,} {row['payload_bytes'] / MIB:>7.1f} "
            f"{row['clients']:>7} {num(row['round_seconds'], '.2f'):>8} "
            f"{num(row['wire_seconds'], '.2f'):>7} {num(row['ratio'], '.2f'):>6} "
            f"{num(peak / MIB if peak else None, '.0f'):>12} "
            f"{row['memory_limit_bytes'] / MIB:>9.0f} {system / (1 << 30):>12.1f} "
            f"{num(cpu_total(row['round_cpu_seconds']), '.1f'):>11} "
            f"{num(cpu_total(row['wire_cpu_seconds']), '.1f'):>10} "
            f"{num(noise_percent(row), '.0f'):>7}"
        )
    return "\n".join(lines)


def noise_percent(row: dict[str, Any]) -> float | None:
    """The larger share of the CPUs other processes took during either measurement, in %."""
    shares = [v for v in row["interference"].values() if v is not None]
    return 100 * max(shares) if shares else None


def cpu_total(cpu: dict[str, float] | None) -> float | None:
    """CPU seconds of the benchmark's own processes (not `other`)."""
    return None if cpu is None else sum(v for k, v in cpu.items() if k != "other")


def parse_list(values: Sequence[str]) -> list[str]:
    return [item for value in values for item in value.split(",") if item]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="fedlink round time and coordinator memory vs the bare mTLS gRPC wire limit"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help=f"any of {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--clients", nargs="+", default=[str(n) for n in DEFAULT_CLIENTS], help="client counts"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds per federation (default {DEFAULT_ROUNDS}); the first is a warm-up",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds allowed per federation/wire run"
    )
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, run dirs)")
    parser.add_argument(
        "--verbose", action="store_true", help="debug logging in the fedlink processes' logs"
    )
    parser.add_argument(
        "--train-spread",
        type=float,
        default=0.0,
        help="client k of N trains (sleeps) k/N of this many seconds a round, so uploads end "
        "spread out as in a real round (round times then include the sleeps: no targets)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is missed, not only on errors"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=300.0,
        help="before each case, wait up to this many seconds for other processes to go quiet",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="measure a case again (keeping the quietest) when other processes disturbed it",
    )
    args = parser.parse_args(argv)
    args.models = parse_list(args.models)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    try:
        args.clients = [int(n) for n in parse_list(args.clients)]
    except ValueError:
        parser.error("--clients takes integers")
    if not args.clients or min(args.clients) < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error("--clients and --rounds must be at least 1")
    if args.retries < 0 or args.quiet_wait < 0:
        parser.error("--retries and --quiet-wait must not be negative")
    return args


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (and its process cleanup) runs."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlink-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    versions: dict[str, str] = {"grpcio": importlib.metadata.version("grpcio"), **source_version()}
    failed = False
    with terminate_on_sigterm():
        try:
            certs = make_certificates(work / "certs", max(args.clients))
            for model in args.models:
                info, torch_version = model_info(model)
                versions["torch"] = torch_version
                rounds = args.rounds or DEFAULT_ROUNDS
                print(
                    f"{model}: {info.parameters:,} parameters, {info.payload_bytes:,} bytes "
                    "as safetensors",
                    flush=True,
                )
                for num_clients in args.clients:
                    row: dict[str, Any] | None = None
                    for attempt in range(1 + args.retries):
                        wait_for_quiet(args.quiet_wait)
                        case_dir = work / f"{model}-{num_clients}" / f"attempt-{attempt + 1}"
                        candidate = run_case(
                            info,
                            num_clients,
                            rounds,
                            certs,
                            case_dir,
                            args.timeout,
                            args.chunk_size,
                            args.verbose,
                            args.train_spread,
                        )
                        candidate["attempt"] = attempt + 1
                        if row is None or (noise_percent(candidate) or 0) < (
                            noise_percent(row) or 0
                        ):
                            row = candidate
                        if (noise_percent(row) or 0) <= 100 * INTERFERENCE_WARNING:
                            break
                        if attempt < args.retries:
                            print("    the machine was busy: measuring this case again", flush=True)
                    assert row is not None
                    failed = failed or bool(row["fedlink"]["error"] or row["wire"]["error"])
                    rows.append(row)
                    write_json(args, rows, began, versions)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            failed = True
        finally:
            if args.keep or failed:
                print(f"work directory kept: {work}")
            elif args.work_dir is None:
                shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(rows))
    results = checks(rows)
    if results:
        print()
    for check in results:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}")
    if rows:
        write_json(args, rows, began, versions)
        print(f"\nwrote {args.out}")
    missed = any(not c["passed"] for c in results)
    return 1 if failed or (args.strict and missed) else 0


def source_version() -> dict[str, str]:
    """The fedlink commit measured, and whether its code (outside benchmarks/) had local edits."""

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], cwd=BENCH_DIR.parent, capture_output=True, text=True, timeout=30
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        # Porcelain lines are "XY path": the status letters take the first three columns.
        changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line[3:]]
    except (OSError, subprocess.SubprocessError):
        return {}
    edited = [path for path in changed if not path.startswith("benchmarks/")]
    return {"fedlink_commit": commit, "uncommitted_changes": ", ".join(edited) or "none"}


def results_header(name: str) -> dict[str, Any]:
    """What every benchmark's JSON starts with: its name, when, and on what machine and code."""
    return {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": importlib.metadata.version("grpcio"),
            **source_version(),
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
    }


def save_results(
    args: argparse.Namespace, document: dict[str, Any], work: Path, failed: bool
) -> int:
    """Write the JSON, keep the work directory when asked or when the run failed; exit code."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if args.keep or failed:
        print(f"work directory kept: {work}")
    elif args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def write_json(
    args: argparse.Namespace, rows: list[dict[str, Any]], began: float, versions: dict[str, str]
) -> None:
    document = {
        "benchmark": "transport",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            **versions,
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        "settings": {
            "models": args.models,
            "clients": args.clients,
            "rounds": args.rounds,
            "chunk_size": args.chunk_size,
            "transport": "gRPC over mutual TLS on 127.0.0.1",
            "round_seconds": "mean of the rounds after the first (metrics.jsonl 'seconds')",
            "wire_seconds": "bare mTLS gRPC, all clients download then upload the same "
            "payload; mean of the repetitions after the first",
            "memory_limit": "3 x safetensors model size + 1 GiB",
        },
        "elapsed_seconds": time.monotonic() - began,
        "results": rows,
        "checks": checks(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    sys.exit(main())
