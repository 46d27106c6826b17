"""docs/deployment.md's separate-machines walkthrough, run as written on separate network hosts.

Each machine is its own network namespace: an offline CA (loopback only), the coordinator at
203.0.113.10 (the address its certificate is issued for) behind the documented firewall, and
three sites that reach it by name (`fl.example.org`, from the namespace's own /etc/hosts) through
a bridge. hospital-c sits behind a throttled (`tc tbf`), lossy (nftables `numgen`) link. The
documented paths (/etc/fedlink, /var/lib/fedlink, /opt/fedlink) are relocated into a directory
per machine; everything else runs verbatim.

Guard: the root namespace would route 203.0.113.0/24 out through the default gateway, so a
command that forgot `ip netns exec` would talk to another machine. A blackhole route for the
subnet is added before any namespace exists and removed, with the namespaces, in `finally`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
README = DOC.parents[1] / "README.md"
SUBNET = "203.0.113.0/24"
ADDRESSES = {
    "coordinator": "203.0.113.10",
    "hospital-a": "203.0.113.21",
    "hospital-b": "203.0.113.22",
    "hospital-c": "203.0.113.23",
}
SERVER_NAME = "fl.example.org"
SITES = ["hospital-a", "hospital-b", "hospital-c"]
LOSSY_SITE = "hospital-c"
RATE = "2mbit"
LOSS_PERCENT = 5
CLOSED_PORT = 8080  # something listens here on the coordinator; the firewall must hide it


def _unmet_requirement() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "creating network namespaces needs root on Linux (CI runs this as root)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"needs `{tool}`: apt-get install {package}"
    if shutil.which("tar") is None:
        return "needs `tar`"
    return None


# ---- the walkthrough as data: every fenced block in "Separate machines" carries a marker ----


@dataclass(frozen=True)
class Block:
    kind: str  # on (commands run to completion), file (written to a path), start, manual
    machine: str  # ca, coordinator or site (every site, with its own name)
    path: str  # for `file`
    text: str


_BLOCK = re.compile(
    r"^<!-- (on|file|start|manual): ?(.*?) -->\n```[a-z]*\n(.*?)^```$", re.MULTILINE | re.DOTALL
)


def _walkthrough() -> str:
    return DOC.read_text().split("## Separate machines", 1)[1]


def _blocks() -> list[Block]:
    blocks = []
    for kind, target, text in _BLOCK.findall(_walkthrough()):
        machine, _, path = target.partition(" ")
        blocks.append(Block(kind, machine if kind != "manual" else "", path, text))
    return blocks


def test_every_block_of_the_walkthrough_says_where_it_runs() -> None:
    fences = _walkthrough().count("\n```") // 2
    assert len(_blocks()) == fences, "each ``` block needs a <!-- on|file|start|manual --> marker"
    manual = [b for b in _blocks() if b.kind == "manual"]
    # Only the systemd/useradd step is left to people: it changes the machine's users and init.
    assert len(manual) == 1 and "systemctl enable --now fedlink-server" in manual[0].text


def _commands(text: str) -> list[str]:
    """Shell commands of `text` that start with `fedlink`, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", "", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("fedlink ")]


def test_the_readme_shows_the_walkthroughs_commands() -> None:
    readme = README.read_text().split("## Running a federation on separate machines", 1)[1]
    readme = readme.split("\n## ", 1)[0]
    walkthrough = re.sub(r"\\\n\s*", "", DOC.read_text())  # continuation lines joined
    commands = _commands(readme)
    assert len(commands) >= 4
    for command in commands:
        assert command in walkthrough, f"README command not in docs/deployment.md: {command}"


# ---- hosts ----


@dataclass
class Hosts:
    tag: str
    root: Path
    namespaces: list[str]
    ports: dict[str, str]  # machine -> its port on the switch

    def ns(self, machine: str) -> str:
        return f"fl{self.tag}-{machine}"

    def dir(self, machine: str) -> Path:
        return self.root / machine

    def relocate(self, machine: str, text: str) -> str:
        """The documented absolute paths, moved into this machine's directory."""
        base = self.dir(machine)
        for path in ("/etc/fedlink", "/var/lib/fedlink", "/etc/systemd/system"):
            text = text.replace(path, f"{base}{path}")
        return text.replace("/opt/fedlink", sys.prefix)

    def env(self) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FEDLINK_")}
        path = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
        return {**environment, "PATH": path, "OMP_NUM_THREADS": "1"}

    def exec_argv(self, machine: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(machine), *argv]

    def run(self, machine: str, script: str, timeout: float = 120) -> str:
        result = subprocess.run(
            self.exec_argv(machine, ["bash", "-euo", "pipefail", "-c", script]),
            cwd=self.dir(machine) / "home",
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"on {machine}:\n{script}\n{result.stdout}{result.stderr}"
        return result.stdout

    def start(self, machine: str, argv: list[str], log: str, cwd: Path | None = None) -> Process:
        with open(self.dir(machine) / log, "wb") as out:
            popen = subprocess.Popen(
                self.exec_argv(machine, argv),
                cwd=cwd or self.dir(machine) / "home",
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return Process(popen, self.dir(machine) / log)


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout}s:\n{self.log.read_text()}"
            ) from None


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True)


def _subnet_in_use() -> bool:
    routes = subprocess.run(["ip", "route", "show", SUBNET], capture_output=True, text=True)
    addresses = subprocess.run(
        ["ip", "-o", "addr", "show", "to", SUBNET], capture_output=True, text=True
    )
    return bool(routes.stdout.strip() or addresses.stdout.strip())


@contextmanager
def _hosts(root: Path) -> Iterator[Hosts]:
    """The CA, the coordinator and the sites as network namespaces on one bridge (its own ns)."""
    # One run at a time on this machine: the root namespace's blackhole route is shared.
    with open(Path(tempfile.gettempdir()) / "fedlink-multihost-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _subnet_in_use():
            pytest.skip(f"{SUBNET} is routed or assigned on this machine; not touching it")
        hosts = Hosts(tag=uuid.uuid4().hex[:6], root=root, namespaces=[], ports={})
        _ip("route", "add", "blackhole", SUBNET)  # guard first
        try:
            switch = hosts.ns("switch")
            _ip("netns", "add", switch)
            hosts.namespaces.append(switch)
            _ip("-n", switch, "link", "add", "name", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for index, machine in enumerate(["ca", *ADDRESSES]):
                ns = hosts.ns(machine)
                _ip("netns", "add", ns)
                hosts.namespaces.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                (hosts.dir(machine) / "home").mkdir(parents=True)
                if machine == "ca":
                    continue  # offline: loopback only
                port = hosts.ports[machine] = f"port{index}"
                _ip(
                    "-n",
                    switch,
                    "link",
                    "add",
                    "name",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                _ip("-n", switch, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{ADDRESSES[machine]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                # `ip netns exec` puts /etc/netns/<ns>/hosts over /etc/hosts: the sites' DNS.
                etc = Path("/etc/netns") / ns
                etc.mkdir(parents=True)
                (etc / "hosts").write_text(
                    f"127.0.0.1 localhost\n{ADDRESSES['coordinator']} {SERVER_NAME}\n"
                )
            yield hosts
        finally:
            _teardown(hosts)


def _teardown(hosts: Hosts) -> None:
    for ns in hosts.namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)  # processes this test started inside its own namespace
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    subprocess.run(["ip", "route", "del", "blackhole", SUBNET], capture_output=True)


# ---- the test ----


def _write_site_data(directory: Path, index: int) -> None:
    """This site's own digits: a disjoint third of the split the coordinator does not test on."""
    digits = load_digits()
    x_train, _, y_train, _ = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    directory.mkdir(parents=True)
    np.savez(
        directory / "digits.npz", x=x_train[index :: len(SITES)], y=y_train[index :: len(SITES)]
    )


def _throttle_and_lose(hosts: Hosts, site: str) -> None:
    """`tc tbf` both ways on the site's link, and nftables dropping LOSS_PERCENT of its packets."""
    tbf = f"qdisc add dev {{dev}} root tbf rate {RATE} burst 16kb latency 200ms".split()
    for ns, dev in ((hosts.ns(site), "eth0"), (hosts.ns("switch"), hosts.ports[site])):
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", *[a.format(dev=dev) for a in tbf]], check=True
        )
    ruleset = f"""table inet lossy {{
    chain input {{ type filter hook input priority 0; numgen random mod 100 < {LOSS_PERCENT} counter drop; }}
    chain output {{ type filter hook output priority 0; numgen random mod 100 < {LOSS_PERCENT} counter drop; }}
}}
"""
    subprocess.run(
        ["ip", "netns", "exec", hosts.ns(site), "nft", "-f", "-"],
        input=ruleset,
        text=True,
        check=True,
    )


def _dropped_packets(hosts: Hosts, site: str) -> int:
    ruleset = subprocess.run(
        ["ip", "netns", "exec", hosts.ns(site), "nft", "list", "table", "inet", "lossy"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", ruleset))


def _bytes_through_tbf(hosts: Hosts, site: str) -> int:
    stats = subprocess.run(
        ["ip", "netns", "exec", hosts.ns(site), "tc", "-s", "qdisc", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tbf" in stats, stats
    return int(re.search(r"Sent (\d+) bytes", stats).group(1))  # type: ignore[union-attr]


def _connects(hosts: Hosts, machine: str, address: str, port: int) -> bool:
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {port}), timeout=2).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    result = subprocess.run(hosts.exec_argv(machine, [sys.executable, "-c", probe]), timeout=30)
    return result.returncode == 0


def _health(hosts: Hosts, site: str, *flags: str) -> subprocess.CompletedProcess[str]:
    bundle = hosts.dir(site) / "etc/fedlink" / site
    argv = [
        "fedlink",
        "health",
        f"--cert={bundle / f'{site}.pem'}",
        f"--key={bundle / f'{site}.key'}",
        f"--ca={bundle / 'ca.pem'}",
        *flags,
    ]
    return subprocess.run(
        hosts.exec_argv(site, argv), env=hosts.env(), capture_output=True, text=True, timeout=60
    )


def _unit(text: str) -> tuple[list[str], Path]:
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    return shlex.split(settings["ExecStart"]), Path(settings["WorkingDirectory"])


@pytest.mark.skipif(_unmet_requirement() is not None, reason=_unmet_requirement() or "")
def test_the_walkthrough_runs_across_hosts_over_mtls_with_a_lossy_site(tmp_path: Path) -> None:
    blocks = _blocks()
    started: list[Process] = []
    with _hosts(tmp_path) as hosts:
        try:
            # The guard: from the root namespace the federation's addresses fail locally.
            with pytest.raises(OSError):
                socket.create_connection((ADDRESSES["coordinator"], 50051), timeout=2)

            # 1. The CA machine, offline.
            for block in blocks:
                if block.machine == "ca":
                    hosts.run("ca", block.text)
            for machine in ["coordinator", *SITES]:  # each archive to its own machine only
                archive = f"{machine}.tar.gz"
                shutil.copy(
                    hosts.dir("ca") / "home" / archive, hosts.dir(machine) / "home" / archive
                )

            # 2. The coordinator: files and commands in the order the document gives them.
            for block in blocks:
                if block.machine != "coordinator":
                    continue
                if block.kind == "file":
                    path = Path(hosts.relocate("coordinator", block.path))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(hosts.relocate("coordinator", block.text))
                elif block.kind == "on":
                    hosts.run("coordinator", hosts.relocate("coordinator", block.text))
            unit = hosts.dir("coordinator") / "etc/systemd/system/fedlink-server.service"
            argv, workdir = _unit(unit.read_text())
            assert argv[0] == f"{sys.prefix}/bin/fedlink"
            server = hosts.start("coordinator", argv, "server.log", cwd=workdir)
            started.append(server)
            hidden = hosts.start(
                "coordinator",
                [
                    sys.executable,
                    "-c",
                    f"import socket,time; s=socket.create_server(('0.0.0.0', {CLOSED_PORT})); time.sleep(600)",
                ],
                "hidden.log",
            )
            started.append(hidden)

            _throttle_and_lose(hosts, LOSSY_SITE)
            deadline = time.monotonic() + 120
            while not _connects(hosts, "hospital-a", SERVER_NAME, 50051):
                assert server.popen.poll() is None, server.log.read_text()
                assert time.monotonic() < deadline, "the coordinator never listened"
                time.sleep(0.5)

            # 3. The sites: own bundle, own data, a health check, then the client.
            for index, site in enumerate(SITES):
                _write_site_data(hosts.dir(site) / "var/lib/fedlink/data", index)
                for block in blocks:
                    if block.machine != "site":
                        continue
                    text = hosts.relocate(site, block.text.replace("hospital-a", site))
                    if block.kind == "file":
                        Path(hosts.relocate(site, block.path)).write_text(text)
                    elif block.kind == "on":
                        output = hosts.run(site, text)
                        assert f"{SERVER_NAME}:50051: SERVING" in output
            for machine in ["coordinator", *SITES]:
                assert not list(hosts.dir(machine).rglob("ca.key")), "the CA key left the CA"
                bundles = {
                    p.name for p in (hosts.dir(machine) / "etc/fedlink").iterdir() if p.is_dir()
                }
                assert bundles == {machine}

            # The certificate holds the coordinator's address too, and nothing else passes.
            by_address = _health(hosts, "hospital-b", f"--server={ADDRESSES['coordinator']}:50051")
            assert by_address.returncode == 0, by_address.stdout + by_address.stderr
            wrong_name = _health(
                hosts,
                "hospital-b",
                f"--server={SERVER_NAME}:50051",
                "--server-name=other.example.org",
            )
            # Named as a trust error with what to do, not as a coordinator that is down.
            assert wrong_name.returncode == 1
            assert "is not valid for the name 'other.example.org'" in wrong_name.stdout
            # The firewall: the coordinator's port is open, a port it did not open is not.
            assert _connects(hosts, "hospital-a", ADDRESSES["coordinator"], 50051)
            assert not _connects(hosts, "hospital-a", ADDRESSES["coordinator"], CLOSED_PORT)
            assert _connects(hosts, "coordinator", "127.0.0.1", CLOSED_PORT)  # it does listen

            (start,) = [b for b in blocks if b.kind == "start" and b.machine == "site"]
            for site in SITES:
                command = hosts.relocate(site, start.text.replace("hospital-a", site))
                started.append(hosts.start(site, shlex.split(command), "client.log"))

            assert server.wait(timeout=300) == 0, server.log.read_text()
            for client in started[2:]:
                assert client.wait(timeout=60) == 0, client.log.read_text()
            dropped = _dropped_packets(hosts, LOSSY_SITE)
            through_tbf = _bytes_through_tbf(hosts, LOSSY_SITE)
        finally:
            for process in started:
                if process.popen.poll() is None:
                    process.popen.kill()
                    process.popen.wait()

    metrics = hosts.dir("coordinator") / "var/lib/fedlink/run/metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["clients_accepted"] == 3 for r in records)
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"]
    assert "federation finished" in server.log.read_text()
    assert dropped > 0, "the lossy link dropped nothing"
    assert through_tbf > 5 * 30_000  # five rounds of a ~38 kB model went up through the tbf
