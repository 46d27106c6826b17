"""The wire limit: bare mTLS gRPC streaming calls with no framework around them.

    python bare_wire.py server --port-file F --cert C --key K --ca CA --size BYTES
    python bare_wire.py client --server HOST:PORT --cert C --key K --ca CA --size BYTES --repeats R

The server has two raw-bytes methods (no protobuf: gRPC's identity serialization): `Download`
streams SIZE bytes in chunks from one buffer that every caller shares (as fedlink's coordinator
streams the global model), and `Upload` consumes a client stream and returns the byte count.

A client connects (TCP + TLS handshake done), prepares its upload buffer, prints `ready` and
waits for a line on stdin; then it downloads SIZE bytes, uploads SIZE bytes and prints one JSON
line with its timings. It does that `--repeats` times. transport.py starts N clients, waits
until all are ready, then releases them together, so process start-up is never timed.

Channel and server options are fedlink's own (same message limits, keepalive and HTTP/2 flow
control settings, thread pool, mTLS credentials), so the only difference from fedlink is the
framework itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from fedlink.client.config import ClientConfig
from fedlink.client.connection import open_channel
from fedlink.common.pki import load_credentials
from fedlink.common.wire import DEFAULT_CHUNK_SIZE, MESSAGE_OVERHEAD

SERVICE = "fedlinkbench.Wire"
DOWNLOAD = f"/{SERVICE}/Download"
UPLOAD = f"/{SERVICE}/Upload"


def make_chunks(size: int, chunk_size: int) -> list[bytes]:
    """SIZE bytes as chunk-sized bytes objects, each in its own written (resident) memory, like a
    real payload (`bytes(n)` would map untouched zero pages, which are unrealistically cheap)."""
    return [
        bytes([offset // chunk_size % 251]) * min(chunk_size, size - offset)
        for offset in range(0, size, chunk_size)
    ]


def serve(args: argparse.Namespace) -> int:
    # The coordinator's own transport settings (keepalive, HTTP/2 flow control). Imported here,
    # not at the top: fedlink.server.transport imports torch, which the clients need not load.
    from fedlink.server.transport import TRANSPORT_OPTIONS

    chunks = make_chunks(args.size, args.chunk_size)
    # A thread per stream: more than the benchmark's concurrent streams, so none ever waits.
    max_workers = 64

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from chunks

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        received = 0
        for data in requests:
            received += len(data)
        return received.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            # None is gRPC's identity (de)serializer: raw bytes in and out.
            "Download": grpc.unary_stream_rpc_method_handler(download),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        handlers=[handler],
        options=[
            ("grpc.max_receive_message_length", args.chunk_size + MESSAGE_OVERHEAD),
            ("grpc.max_send_message_length", args.chunk_size + MESSAGE_OVERHEAD),
            *TRANSPORT_OPTIONS,
        ],
    )
    creds = load_credentials(args.cert, args.key, args.ca, role="server")
    credentials = grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    tmp = args.port_file.with_name(args.port_file.name + ".tmp")
    tmp.write_text(f"127.0.0.1:{port}\n")
    tmp.replace(args.port_file)
    # Runs until the benchmark terminates it (or a safety timeout passes).
    stopped = threading.Event()
    stopped.wait(args.lifetime)
    server.stop(grace=1.0).wait()
    return 0


def run_client(args: argparse.Namespace) -> int:
    config = ClientConfig(server=args.server, cert=args.cert, key=args.key, ca=args.ca)
    channel = open_channel(config)
    grpc.channel_ready_future(channel).result(timeout=60)
    download: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(DOWNLOAD)
    upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(UPLOAD)
    chunks = make_chunks(args.size, args.chunk_size)
    try:
        for _ in range(args.repeats):
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                return 1
            started = time.monotonic()
            received = 0
            for data in download(b"", timeout=args.call_timeout):
                received += len(data)
            downloaded = time.monotonic()
            reply = upload(iter(chunks), timeout=args.call_timeout)
            finished = time.monotonic()
            sent = int.from_bytes(reply, "little")
            print(
                json.dumps(
                    {
                        "download_seconds": downloaded - started,
                        "upload_seconds": finished - downloaded,
                        "bytes_down": received,
                        "bytes_up": sent,
                    }
                ),
                flush=True,
            )
    finally:
        channel.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("server", "client"):
        sub = commands.add_parser(name)
        sub.add_argument("--cert", type=Path, required=True)
        sub.add_argument("--key", type=Path, required=True)
        sub.add_argument("--ca", type=Path, required=True)
        sub.add_argument("--size", type=int, required=True, help="payload bytes each way")
        sub.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    server = commands.choices["server"]
    server.add_argument("--port-file", type=Path, required=True)
    server.add_argument("--lifetime", type=float, default=3600.0, help="exit after this long")
    client = commands.choices["client"]
    client.add_argument("--server", required=True)
    client.add_argument("--repeats", type=int, default=1)
    client.add_argument("--call-timeout", type=float, default=600.0)
    args = parser.parse_args()
    return serve(args) if args.command == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
