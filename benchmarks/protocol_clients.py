"""Protocol-level load clients: thousands of fedlink identities as coroutines of one process.

Each identity speaks the real wire protocol (protos/fedlink/v1/federation.proto) over its own
grpc.aio channel, TLS connection and client certificate: Join, a PullTask long poll, a chunked
download checked against its size and digest, a chunked PushResult, Heartbeats at the interval
the coordinator asks for, and the real client's retry rules (Join again on JOIN_REQUIRED, back off
on transient codes). Training is skipped: an identity sends the downloaded global model back
unchanged, a valid safetensors update that passes the coordinator's validation. No torch is
imported, so one process holds thousands of identities and the benchmark measures the
coordinator, not the clients.

Certificates: a real client has its own key; here every identity of a run shares one key pair
and gets its own certificate (its own common name, serial number and signature from the
federation CA, with the extensions `fedlink certs issue --client` writes). The coordinator takes
identity from the certificate's name alone, so this is the same to it, and issuing 10,000
certificates takes about a second instead of generating 10,000 keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import resource
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedlink import __version__
from fedlink.common.errors import PayloadError
from fedlink.common.pki import CA_CERT_FILE, CA_KEY_FILE, init_ca, issue_certificate
from fedlink.common.wire import (
    ENCODING,
    JOIN_REQUIRED,
    MAX_CHUNK_SIZE,
    MESSAGE_OVERHEAD,
    SESSION_METADATA_KEY,
    PayloadAssembler,
    PayloadInfo,
)
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

# As client/connection.py: codes that mean "retry later", not "go away".
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
JOIN_TIMEOUT_SECONDS = 30.0  # as the real client
RECONNECT_MAX_DELAY_SECONDS = 30.0  # the client's defaults (client/config.py)
RECONNECT_TIMEOUT_SECONDS = 300.0
# The tiny model is ~10 KB; anything far larger is a coordinator bug, not a model.
MAX_MODEL_BYTES = 1 << 30
CERTS_FILE = "identities.pem"
KEY_FILE = "identity.key"
EXAMPLES_PER_UPDATE = 100  # each identity's FedAvg weight, as noop_task's clients

Emit = Callable[[dict[str, Any]], None]


# ---- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityFiles:
    """Where `issue_identities` wrote the CA, the shared key and every identity's certificate."""

    ca: Path
    key: Path
    certs: Path


def issue_identities(ca_dir: Path, out_dir: Path, names: Sequence[str]) -> IdentityFiles:
    """One certificate per name, all for one key pair, signed by the CA in `ca_dir` (created
    when missing), with the profile of `fedlink certs issue --client`; PEMs in name order."""
    if not (ca_dir / CA_KEY_FILE).exists():
        init_ca(ca_dir)
    # A certificate issued the ordinary way is the template: same extensions, validity, key.
    template_paths = issue_certificate(ca_dir, out_dir / "template", "template", role="client")
    template = x509.load_pem_x509_certificate(template_paths.cert.read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)  # init_ca makes P-256 keys
    pems = []
    for name in names:
        builder = x509.CertificateBuilder(
            issuer_name=template.issuer,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
            public_key=template.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=template.not_valid_before_utc,
            not_valid_after=template.not_valid_after_utc,
            extensions=list(template.extensions),
        )
        certificate = builder.sign(ca_key, hashes.SHA256())
        pems.append(certificate.public_bytes(serialization.Encoding.PEM))
    files = IdentityFiles(
        ca=out_dir / CA_CERT_FILE, key=out_dir / KEY_FILE, certs=out_dir / CERTS_FILE
    )
    files.ca.write_bytes((ca_dir / CA_CERT_FILE).read_bytes())
    files.key.write_bytes(template_paths.key.read_bytes())
    files.key.chmod(0o600)
    files.certs.write_bytes(b"".join(pems))
    return files


def read_identities(files: IdentityFiles, first: int, count: int) -> list[tuple[str, bytes]]:
    """(name, certificate PEM) of identities first .. first + count - 1 (0-based)."""
    marker = b"-----END CERTIFICATE-----\n"
    pems = [block + marker for block in files.certs.read_bytes().split(marker) if block.strip()]
    chosen = pems[first : first + count]
    names = []
    for pem in chosen:
        subject = x509.load_pem_x509_certificate(pem).subject
        names.append(str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value))
    return list(zip(names, chosen, strict=True))


# As safetensors names torch's dtypes in its header.
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def check_manifest(model: bytes, manifest: Sequence[pb.TensorManifestEntry]) -> None:
    """The downloaded model's tensors (from its safetensors header) are the ones Join announced;
    the real client checks the same against its own model. Fatal if not."""
    try:
        length = int.from_bytes(model[:8], "little")
        header = json.loads(model[8 : 8 + length])
        served = sorted(
            (name, SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]), tuple(entry["shape"]))
            for name, entry in header.items()
            if name != "__metadata__"
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Fatal("download", f"the global model is not safetensors: {exc}") from None
    announced = sorted((e.name, e.dtype, tuple(e.shape)) for e in manifest)
    if served != announced:
        raise Fatal("manifest", "the global model's tensors differ from Join's manifest")


# ---- one identity ----------------------------------------------------------------------------


class Fatal(Exception):
    """This identity stops: the coordinator refused it, or it was unreachable for too long.
    `kind` groups failures in the report ("join:PERMISSION_DENIED", "download", ...)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Stats:
    """What all identities of this process saw, for the report."""

    started: float = field(default_factory=time.monotonic)
    join_latencies: list[float] = field(default_factory=list)
    joined_at: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # retried: "rpc:CODE"
    # The first few retried errors of each kind as gRPC described them (details, debug string).
    error_examples: dict[str, list[str]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)  # every call made, by RPC
    fatal: Counter[str] = field(default_factory=Counter)  # identities that gave up, by kind
    fatal_examples: list[str] = field(default_factory=list)
    downloads: int = 0
    pushes_accepted: int = 0
    stopped: int = 0  # identities told STOP: the federation finished
    # Digests of global models whose tensors were checked against Join's manifest: every
    # identity downloads the same bytes, so one check per model and process is enough.
    models_checked: set[bytes] = field(default_factory=set)

    def retried(self, kind: str, exc: grpc.aio.AioRpcError) -> None:
        self.errors[kind] += 1
        examples = self.error_examples.setdefault(kind, [])
        if len(examples) < 3:
            examples.append(f"{exc.details()} | {exc.debug_error_string()}"[:500])

    def fail(self, kind: str, detail: str) -> None:
        self.fatal[kind] += 1
        if len(self.fatal_examples) < 10:
            self.fatal_examples.append(detail[:300])


class Identity:
    """One federation participant over its own channel, following the real client's protocol."""

    def __init__(self, name: str, channel: grpc.aio.Channel, stats: Stats) -> None:
        self.name = name
        self._channel = channel
        self._stub = pb_grpc.FederationStub(channel)
        self._stats = stats
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._join: pb.JoinReply | None = None
        self._in_call = False  # a poll, download or upload in progress: no heartbeats meanwhile
        self._attempt = 0
        self._failing_since: float | None = None

    async def run(self) -> None:
        began = time.monotonic()
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self._connect()
            self._stats.join_latencies.append(time.monotonic() - began)
            self._stats.joined_at.append(time.monotonic())
            heartbeat = asyncio.create_task(self._heartbeats())
            while True:
                try:
                    if not await self._pull_and_answer():
                        break
                    self._attempt, self._failing_since = 0, None
                except grpc.aio.AioRpcError as exc:
                    await self._recover("pull", exc)
            self._stats.stopped += 1
        except Fatal as exc:
            self._stats.fail(exc.kind, f"{self.name}: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported, not raised: one identity must not stop the rest
            self._stats.fail(type(exc).__name__, f"{self.name}: {type(exc).__name__}: {exc}")
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            await self._channel.close()

    async def _backoff(self, what: str) -> None:
        """The real client's exponential backoff with full jitter; Fatal once it gives up."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since > RECONNECT_TIMEOUT_SECONDS:
            raise Fatal(f"{what} (gave up)", "coordinator unreachable for too long")
        delay = random.uniform(0, min(RECONNECT_MAX_DELAY_SECONDS, 0.5 * 2**self._attempt))
        self._attempt += 1
        await asyncio.sleep(delay)

    async def _connect(self) -> None:
        while True:
            self._stats.calls["join"] += 1
            call = self._stub.Join(
                pb.JoinRequest(client_version=__version__), timeout=JOIN_TIMEOUT_SECONDS
            )
            try:
                reply = await call
                trailing = await call.trailing_metadata()
                break
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self._stats.retried(f"join:{code.name}", exc)
                if code not in TRANSIENT_CODES:
                    raise Fatal(f"join:{code.name}", str(exc.details())) from None
                await self._backoff(f"join:{code.name}")
        self._metadata = tuple(
            (key, str(value)) for key, value in (trailing or ()) if key == SESSION_METADATA_KEY
        )
        if reply.identity != self.name:
            raise Fatal("identity", f"the coordinator calls {self.name} {reply.identity!r}")
        if not reply.model_manifest_sha256 or not reply.model_manifest:
            raise Fatal("join", "the reply carries no model manifest")
        self._join = reply
        self._attempt, self._failing_since = 0, None

    async def _recover(self, rpc: str, exc: grpc.aio.AioRpcError) -> None:
        """As the real client: Join again when the coordinator forgot us, back off on a
        transient code, stop on any other."""
        code = exc.code()
        self._stats.retried(f"{rpc}:{code.name}", exc)
        if exc.details() == JOIN_REQUIRED:
            await self._connect()
        elif code in TRANSIENT_CODES:
            await self._backoff(f"{rpc}:{code.name}")
        else:
            raise Fatal(f"{rpc}:{code.name}", str(exc.details())) from None

    async def _pull_and_answer(self) -> bool:
        """Pull one task and answer it; False once told to stop. As the real client, no
        heartbeats while a call is in progress (the poll, the download, the upload)."""
        self._in_call = True
        try:
            return await self._answer_next_task()
        finally:
            self._in_call = False

    async def _answer_next_task(self) -> bool:
        self._stats.calls["pull"] += 1
        call = self._stub.PullTask(pb.PullTaskRequest(), metadata=self._metadata)
        first = await call.read()
        if not isinstance(first, pb.TaskMessage) or first.WhichOneof("message") != "header":
            raise Fatal("protocol", "a task stream without a header")
        header = first.header
        if header.kind == pb.TASK_KIND_STOP:
            return False
        if header.kind == pb.TASK_KIND_WAIT:
            self._in_call = False
            if header.retry_after_seconds > 0:
                await asyncio.sleep(min(header.retry_after_seconds, 60.0))
            return True
        if header.kind not in (pb.TASK_KIND_TRAIN, pb.TASK_KIND_EVALUATE):
            raise Fatal("protocol", f"task kind {header.kind} (no secure aggregation here)")
        model = await self._download(header, call)
        self._stats.downloads += 1
        if header.kind == pb.TASK_KIND_TRAIN:
            await self._push(header, {"loss": 0.0}, model)
        else:
            await self._push(header, {"loss": 0.0, "accuracy": 0.0}, None)
        return True

    async def _download(
        self, header: pb.TaskHeader, call: grpc.aio.UnaryStreamCall[Any, Any]
    ) -> bytes:
        """The payload's chunks, checked against the announced size and digest."""
        info = PayloadInfo(header.payload.size, header.payload.blake3, header.payload.encoding)
        sink = io.BytesIO()
        try:
            assembler = PayloadAssembler(info, sink, max_size=MAX_MODEL_BYTES)
            # read(), not `async for`: grpc.aio refuses to mix the two styles on one call.
            while isinstance(message := await call.read(), pb.TaskMessage):
                if message.WhichOneof("message") != "chunk":
                    raise PayloadError("a second header in the task stream")
                assembler.add(message.chunk.offset, message.chunk.data)
            assembler.finish()
        except PayloadError as exc:
            raise Fatal("download", str(exc)) from None
        model = sink.getvalue()
        assert self._join is not None
        if header.payload.blake3 not in self._stats.models_checked:
            check_manifest(model, self._join.model_manifest)
            self._stats.models_checked.add(header.payload.blake3)
        return model

    async def _push(
        self, task: pb.TaskHeader, metrics: dict[str, float], payload: bytes | None
    ) -> None:
        assert self._join is not None
        chunk_size = self._join.chunk_size

        async def messages() -> AsyncIterator[pb.ResultMessage]:
            header = pb.ResultHeader(
                task_id=task.task_id,
                round=task.round,
                num_examples=EXAMPLES_PER_UPDATE,
                metrics=metrics,
            )
            if payload is not None:
                # The bytes received: the header's digest still describes them.
                header.payload.CopyFrom(
                    pb.PayloadInfo(size=len(payload), blake3=task.payload.blake3, encoding=ENCODING)
                )
            yield pb.ResultMessage(header=header)
            for offset in range(0, len(payload or b""), chunk_size):
                assert payload is not None
                data = payload[offset : offset + chunk_size]
                yield pb.ResultMessage(chunk=pb.Chunk(offset=offset, data=data))

        while True:
            self._stats.calls["push"] += 1
            try:
                reply = await self._stub.PushResult(messages(), metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self._stats.retried(f"push:{code.name}", exc)
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await self._backoff(f"push:{code.name}")
                    continue
                if code in TRANSIENT_CODES:  # as the real client: pause, pull the task again
                    await self._backoff(f"push:{code.name}")
                    return
                return  # refused: this round only, as the real client
            if reply.accepted:
                self._stats.pushes_accepted += 1
            return

    async def _heartbeats(self) -> None:
        assert self._join is not None
        interval = max(0.5, self._join.heartbeat_interval_seconds)
        while True:
            await asyncio.sleep(interval)
            if self._in_call:
                continue
            self._stats.calls["heartbeat"] += 1
            try:
                await self._stub.Heartbeat(
                    pb.HeartbeatRequest(), metadata=self._metadata, timeout=interval
                )
            except grpc.aio.AioRpcError as exc:
                self._stats.retried(f"heartbeat:{exc.code().name}", exc)


# ---- the worker process ----------------------------------------------------------------------


def open_channel(server: str, ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> grpc.aio.Channel:
    """A channel with the real client's options, and a subchannel of its own: gRPC would
    otherwise share one connection between channels it considers equal."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", MAX_CHUNK_SIZE + MESSAGE_OVERHEAD),
        ("grpc.max_send_message_length", MAX_CHUNK_SIZE + MESSAGE_OVERHEAD),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.aio.secure_channel(server, credentials, options=options)


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to `needed` (at most the hard limit); the new
    soft limit. A connection is one descriptor on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


async def run_identities(
    server: str, files: IdentityFiles, first: int, count: int, emit: Emit
) -> Stats:
    """Run identities first .. first + count - 1 until each is told to stop or gives up."""
    ca_pem, key_pem = files.ca.read_bytes(), files.key.read_bytes()
    stats = Stats()
    identities = [
        Identity(name, open_channel(server, ca_pem, key_pem, pem), stats)
        for name, pem in read_identities(files, first, count)
    ]
    tasks = [asyncio.create_task(identity.run()) for identity in identities]
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: [task.cancel() for task in tasks])

    async def announce_joined() -> None:
        while len(stats.joined_at) < count and not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
        if len(stats.joined_at) == count:
            emit({"event": "joined", "count": count, "at": max(stats.joined_at)})

    announcer = asyncio.create_task(announce_joined())
    await asyncio.gather(*tasks, return_exceptions=True)
    announcer.cancel()
    return stats


def report(stats: Stats, count: int) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    latencies = sorted(stats.join_latencies)
    return {
        "event": "report",
        "identities": count,
        "joined": len(stats.joined_at),
        "last_joined_at": max(stats.joined_at, default=None),
        "join_latency_p50": statistics.median(latencies) if latencies else None,
        "join_latency_max": latencies[-1] if latencies else None,
        "stopped": stats.stopped,
        "downloads": stats.downloads,
        "pushes_accepted": stats.pushes_accepted,
        "errors": dict(stats.errors),
        "error_examples": stats.error_examples,
        "calls": dict(stats.calls),
        "fatal": dict(stats.fatal),
        "fatal_examples": stats.fatal_examples,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }


def run_worker(server: str, directory: Path, first: int, count: int) -> int:
    """The `protocol-worker` command: print JSON lines (a "joined" event, then a "report")."""
    raise_fd_limit(count + 256)
    files = IdentityFiles(
        ca=directory / CA_CERT_FILE, key=directory / KEY_FILE, certs=directory / CERTS_FILE
    )

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)

    stats = asyncio.run(run_identities(server, files, first, count, emit))
    emit(report(stats, count))
    return 0


if __name__ == "__main__":
    print("run through benchmarks/load.py --protocol", file=sys.stderr)
    sys.exit(2)
