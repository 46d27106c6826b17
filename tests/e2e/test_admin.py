"""The Admin service, `fedlink status` / `fedlink admin` and the live dashboard, against live
coordinators over mutual TLS (real processes where the behaviour spans processes)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import wait_for_file
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_fault_tolerance import _wait_until
from test_federation_run import _client, _kill_all, _log, _server

from fedlink.common.pki import ADMIN_USAGE, init_ca, issue_certificate
from fedlink.common.tensors import StateDict
from fedlink.v1 import admin_pb2 as pb
from fedlink.v1 import admin_pb2_grpc as pb_grpc
from fedlink.v1 import federation_pb2 as fpb


def _admin_bundle(pki: Any, name: str = "operator") -> tuple[Path, Path, Path]:
    bundle = pki.root / name
    if not (bundle / f"{name}.pem").exists():
        issue_certificate(pki.ca_dir, bundle, name, role="admin")
    return bundle / f"{name}.pem", bundle / f"{name}.key", bundle / "ca.pem"


def _channel(address: str, cert: Path, key: Path, ca: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def _status_code(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    try:
        pb_grpc.AdminStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_only_admin_certificates_may_call_the_admin_service(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    address = coordinator.address

    admin = _channel(address, *_admin_bundle(pki))
    reply = pb_grpc.AdminStub(admin).GetStatus(pb.GetStatusRequest(), timeout=10)
    assert reply.state == "waiting for clients" and reply.clients_needed == 50
    assert reply.num_rounds == 1

    # A federation client's certificate: known, but no administrator.
    code, details = _status_code(pki.channel(address, "site-0"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "not an admin certificate" in details

    # The coordinator's own certificate, presented as a TLS client: it states no client-auth
    # usage, so the handshake refuses it ("unsupported certificate purpose"); the Admin
    # service's own check (unit-tested in test_pki) would too.
    server = pki.server_dir
    code, details = _status_code(
        _channel(address, server / "server.pem", server / "server.key", server / "ca.pem")
    )
    assert code == grpc.StatusCode.UNAVAILABLE, details

    # An admin certificate of another federation's CA never gets past the handshake.
    init_ca(tmp_path / "foreign-ca")
    issue_certificate(tmp_path / "foreign-ca", tmp_path / "foreign", "operator", role="admin")
    foreign = tmp_path / "foreign"
    code, _ = _status_code(
        _channel(address, foreign / "operator.pem", foreign / "operator.key", pki.ca_pem)
    )
    assert code == grpc.StatusCode.UNAVAILABLE

    # An admin certificate is no federation client.
    from fedlink.v1 import federation_pb2_grpc as fpb_grpc

    with pytest.raises(grpc.RpcError) as refused:
        fpb_grpc.FederationStub(admin).Join(fpb.JoinRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "is an admin certificate" in (refused.value.details() or "")


def test_a_certificate_with_both_admin_and_server_usage_is_refused(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH, ADMIN_USAGE]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "both")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "both.pem", tmp_path / "both.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    code, details = _status_code(_channel(coordinator.address, cert_path, key_path, pki.ca_pem))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "ambiguous" in details


def _cli(command: str, *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FEDLINK_")}
    return subprocess.run(
        [sys.executable, "-m", "fedlink", command, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def _admin_flags(pki: Any, address: str) -> list[str]:
    cert, key, ca = _admin_bundle(pki)
    return [f"--server={address}", f"--cert={cert}", f"--key={key}", f"--ca={ca}"]


def _status(pki: Any, address: str) -> dict[str, Any]:
    result = _cli("status", *_admin_flags(pki, address), "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def test_status_exclude_and_stop_against_a_live_federation(pki: Any, tmp_path: Path) -> None:
    address_file = tmp_path / "address"
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "address_file": address_file,
        "num_rounds": 100_000,  # rounds take a fraction of a second: stopped long before
        "min_clients": 2,
        "min_fit_clients": 1,
        "evaluate_every": 0,
    }
    server = _server(pki, tmp_path, "run", **settings)
    clients: list[subprocess.Popen[bytes]] = []
    restarted = None
    try:
        address = wait_for_file(address_file, server)
        clients = [_client(pki, tmp_path, f"site-{i}", address) for i in range(2)]

        def rounds_done() -> bool:
            return _status(pki, address)["completed_rounds"] >= 1

        _wait_until(rounds_done, "a completed round in fedlink status", timeout=180, poll=1)

        # The table: a summary line, both clients, the log.
        table = _cli("status", *_admin_flags(pki, address), "--log-lines=5")
        assert table.returncode == 0, table.stderr
        (tmp_path / "status.txt").write_text(table.stdout)
        assert re.search(r"state: running\s+round \d+ of 100000", table.stdout), table.stdout
        assert re.search(r"^site-0\s+yes\s+\d+ s ago", table.stdout, re.MULTILINE), table.stdout
        assert re.search(r"^site-1\s+yes", table.stdout, re.MULTILINE), table.stdout
        assert "accepted" in table.stdout and "fedlink.server" in table.stdout

        # --watch prints again and again until interrupted.
        watch_flags = ["--watch", "--json", "--interval-seconds=0.5", "--log-lines=0"]
        watch = subprocess.Popen(
            [sys.executable, "-m", "fedlink", "status", *_admin_flags(pki, address), *watch_flags],
            stdout=subprocess.PIPE,
            text=True,
        )
        # Start-up takes seconds on a loaded machine; a stuck --watch is killed, not waited for.
        guard = threading.Timer(120, watch.kill)
        guard.start()
        try:
            assert watch.stdout is not None
            snapshots = [json.loads(watch.stdout.readline()) for _ in range(3)]
        finally:
            guard.cancel()
            watch.send_signal(signal.SIGINT)
            watch.communicate(timeout=30)
        assert snapshots[-1]["updated_unix"] > snapshots[0]["updated_unix"]
        assert watch.returncode == 0  # Ctrl-C ends a watch cleanly, between two calls

        # Exclude site-1: its calls are refused with a message saying so, and it stops.
        excluded = _cli(
            "admin", "exclude", "site-1", "--reason=slow disk", *_admin_flags(pki, address)
        )
        assert excluded.returncode == 0, excluded.stderr
        assert clients[1].wait(timeout=60) != 0
        assert "excluded from this run by the federation's administrator" in _log(
            tmp_path, "site-1"
        )
        assert "slow disk" in _log(tmp_path, "site-1")
        status = _status(pki, address)
        (site_1,) = [c for c in status["clients"] if c["identity"] == "site-1"]
        assert site_1["excluded"] and not site_1["connected"]
        assert "slow disk" in site_1["last_error"]
        completed = status["completed_rounds"]
        _wait_until(
            lambda: _status(pki, address)["completed_rounds"] >= completed + 2,
            "rounds with site-0 alone",
            timeout=120,
            poll=0.5,
        )
        again = _cli("admin", "exclude", "site-1", *_admin_flags(pki, address))
        assert "already was" in again.stdout

        # Stop: the coordinator stops as on SIGTERM (exit 0, resumable) before round 200.
        stopped = _cli("admin", "stop", "--reason=maintenance", *_admin_flags(pki, address))
        assert stopped.returncode == 0, stopped.stderr
        assert server.wait(timeout=60) == 0, _log(tmp_path, "run")
        log = _log(tmp_path, "run")
        assert "administrator operator asked to stop the run (maintenance)" in log
        assert "start again on" in log and "to resume" in log
        finished = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        assert finished < 100_000

        # A coordinator restarted on the same state_dir still refuses site-1.
        address_file.unlink()
        restarted = _server(pki, tmp_path, "run", **settings)
        address = wait_for_file(address_file, restarted)
        from fedlink.v1 import federation_pb2_grpc as fpb_grpc

        with pytest.raises(grpc.RpcError) as refused:
            fpb_grpc.FederationStub(pki.channel(address, "site-1")).Join(
                fpb.JoinRequest(), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "slow disk" in (refused.value.details() or "")
    finally:
        _kill_all([server, restarted, *clients])


def _chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _spki_hash(cert: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 SHA-256 of the
    certificate's public key, so exactly this certificate is trusted, not any."""
    import base64
    import hashlib

    public_key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def chromium_dom(
    browser: str, url: str, cert: Path, profile: Path, screenshot: Path | None = None
) -> str:
    """The page's DOM after its scripts ran for a few (virtual) seconds, from headless Chromium."""
    arguments = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        f"--user-data-dir={profile}",
        f"--ignore-certificate-errors-spki-list={_spki_hash(cert)}",
        "--virtual-time-budget=8000",
        "--window-size=1100,1000",
    ]
    if screenshot is not None:
        arguments.append(f"--screenshot={screenshot}")
    else:
        arguments.append("--dump-dom")
    result = subprocess.run(
        [*arguments, url], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_dashboard_shows_a_live_federation_in_chromium(pki: Any, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium: apt-get install chromium-headless-shell (.ci/run does)")
    address_file = tmp_path / "address"
    token_file = tmp_path / "dashboard-token"
    server = _server(
        pki,
        tmp_path,
        "run",
        listen="127.0.0.1:0",
        address_file=address_file,
        num_rounds=100_000,
        min_clients=2,
        dashboard_listen="127.0.0.1:0",
        dashboard_token_file=token_file,
    )
    clients: list[subprocess.Popen[bytes]] = []
    try:
        address = wait_for_file(address_file, server)
        clients = [_client(pki, tmp_path, f"site-{i}", address) for i in range(2)]
        _wait_until(lambda: "dashboard on https://" in _log(tmp_path, "run"), "the dashboard")
        match = re.search(r"dashboard on https://127\.0\.0\.1:(\d+)/", _log(tmp_path, "run"))
        assert match is not None
        base = f"https://127.0.0.1:{match.group(1)}"
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o077 == 0
        assert token not in _log(tmp_path, "run")

        # The data needs the token; the page itself holds none.
        context = ssl.create_default_context(cafile=str(pki.ca_pem))
        context.check_hostname = False
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/api/status", context=context, timeout=10)
        assert denied.value.code == 401
        wrong = urllib.request.Request(
            f"{base}/api/status", headers={"Authorization": "Bearer " + "x" * 43}
        )
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(wrong, context=context, timeout=10)
        assert denied.value.code == 401

        url = f"{base}/#token={token}"
        cert = pki.server_dir / "server.pem"
        deadline = time.monotonic() + 240
        while True:
            dom = chromium_dom(browser, url, cert, tmp_path / "profile")
            if re.search(r'<tr data-round="[1-9]', dom):
                break
            assert time.monotonic() < deadline, f"no round appeared on the dashboard:\n{dom}"
            time.sleep(2)
        assert 'data-client="site-0"' in dom and 'data-client="site-1"' in dom
        assert re.search(r'<b id="state">running</b>', dom), dom
        assert re.search(r'<polyline[^>]*data-metric="test_accuracy"', dom), dom
        assert 'id="problem"></p>' in dom  # no error shown
        if os.environ.get("FEDLINK_DASHBOARD_SCREENSHOT"):
            _wait_until(
                lambda: len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 6,
                "six rounds for the screenshot",
            )
            chromium_dom(
                browser,
                url,
                cert,
                tmp_path / "profile",
                screenshot=Path(os.environ["FEDLINK_DASHBOARD_SCREENSHOT"]),
            )

        # Without the token the page asks for it and shows nothing.
        dom = chromium_dom(browser, f"{base}/", cert, tmp_path / "profile")
        assert "enter the token" in dom and "<tr data-client" not in dom
    finally:
        _kill_all([server, *clients])
