"""The live dashboard: a read-only web page on a listener of its own, off unless configured.

Served over HTTPS with the coordinator's own certificate. The page itself holds no data; the
JSON it polls (`/api/status`, the same snapshot the Admin service answers with, plus the
completed rounds' metrics and the last log lines) needs the token from `dashboard_token_file`
as a bearer token. A token rather than an admin client certificate: browsers make client
certificates hard (PKCS#12 import into an OS store, prompts, no PEM), while a token file on the
coordinator's disk (0600) is readable exactly by whoever may run the coordinator, and the page
keeps it in the URL fragment, which browsers never send to a server or a log. Requests are
bounded: a few handler threads, a timeout on every connection (the TLS handshake included), no
request bodies.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from fedlink.common.errors import ConfigError
from fedlink.server.config import ServerConfig
from fedlink.server.status import RecentLogs, RunStatus

log = logging.getLogger(__name__)

TOKEN_FILE = "dashboard-token"  # noqa: S105 (a file name, not a secret)
MIN_TOKEN_CHARS = 32
# Connections handled at once; more are closed at once (the page polls every 2 s).
MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT = 10.0
LOG_LINES = 50


class Dashboard:
    """The HTTPS listener and its thread."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    @classmethod
    def start(cls, config: ServerConfig, status: RunStatus, logs: RecentLogs) -> Dashboard | None:
        """The dashboard `config` asks for (None when `dashboard_listen` is unset)."""
        if config.dashboard_listen is None:
            return None
        host, _, port = config.dashboard_listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"dashboard_listen must be host:port, got {config.dashboard_listen!r}"
            )
        assert config.cert and config.key, "a coordinator with TLS has a certificate"
        token_file = config.dashboard_token_file or config.state_dir / TOKEN_FILE
        token = load_token(token_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(config.cert, config.key)
        host = host.strip("[]")
        try:
            server = _Server((host, int(port)), _Handler, ipv6=":" in host)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on dashboard_listen {config.dashboard_listen}: {exc.strerror}; "
                "choose another address"
            ) from None
        server.configure(context, token, status, logs)
        thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
        thread.start()
        dashboard = cls(server, thread)
        log.info(
            "dashboard on https://%s:%d/ (open it as https://%s:%d/#token=TOKEN, the token is in "
            "%s)",
            host,
            dashboard.port,
            host,
            dashboard.port,
            token_file,
        )
        return dashboard

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def load_token(path: Path) -> str:
    """The dashboard token in `path`, created (random, 0600) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create the dashboard token {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        log.info("created the dashboard token %s", path)
        return token
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the dashboard token {path}: {exc}") from None
    if len(token) < MIN_TOKEN_CHARS or not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", token):
        raise ConfigError(
            f"the dashboard token in {path} must be at least {MIN_TOKEN_CHARS} URL-safe "
            "characters; delete the file to have the coordinator create a random one"
        )
    return token


def _page() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that allows exactly its inline script and style
    (by hash) and requests to this origin: nothing else runs, loads or frames it."""
    html = resources.files("fedlink.server").joinpath("dashboard.html").read_text()
    hashes = {}
    for tag in ("script", "style"):
        match = re.search(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        assert match is not None, f"dashboard.html has no inline <{tag}>"
        digest = base64.b64encode(hashlib.sha256(match.group(1).encode()).digest()).decode()
        hashes[tag] = f"'sha256-{digest}'"
    policy = (
        f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html.encode(), policy


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], handler: Any, *, ipv6: bool) -> None:
        if ipv6:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def configure(
        self, context: ssl.SSLContext, token: str, status: RunStatus, logs: RecentLogs
    ) -> None:
        self.context = context
        self.token = token.encode()
        self.status = status
        self.logs = logs
        self.page, self.policy = _page()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close at once, hold nothing
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, on the connection's own thread and under its
        # timeout, so a peer that never finishes one holds only its own slot.
        request.settimeout(CONNECTION_TIMEOUT)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            _Handler(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CONNECTION_TIMEOUT
    server_version = "fedlink-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/status":
            if not self._authorized():
                self._send_json(401, {"error": "a valid dashboard token is required"})
                return
            self._send_json(
                200,
                {
                    "status": self.server.status.snapshot(),
                    "rounds": self.server.status.rounds(),
                    "log": self.server.logs.lines(LOG_LINES),
                },
            )
        else:
            self._send_json(404, {"error": "not found"})

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.server.token
        )

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(_finite(body), allow_nan=False).encode()
        self._send(code, data, "application/json")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", self.server.policy)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # Every poll would be a line; only the Admin service's actions are worth logging.
        pass


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as null: JSON has no such numbers, and a browser's
    JSON.parse refuses Python's spelling of them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
