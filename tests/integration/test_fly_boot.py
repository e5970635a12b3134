"""A simulated Fly Machine, booted for real: `fly ssh console`'s path works out of the box.

The container is booted exactly as on Fly (``FLY_MACHINE_ID`` in its environment, nothing
IPv6-related configured) in a test world that plays Fly's network: a 6PN address
(fdaa:0:1::2/48) on its interface, Fly's resolver at fdaa::3 and an operator arriving
from fdaa::/16, and no IPv6 connection tracking in the container's netns (a ``notrack``
table the test installs, as Fly's kernel has none). A real SSH server (dropbear) runs
inside as root on port 22 with a throwaway host key; a client in the world logs in with
a throwaway key over IPv6 and runs a command. Meanwhile the agent opens no IPv6
connection to anything, the DNS user reaches Fly's resolver and nothing else, and
nothing else comes in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import FullBoot, default_names, full_boot, publish_names
from codetainer.sandbox.world import (
    FLY_MACHINE,
    FLY_OPERATOR,
    FLY_PEER,
    FLY_RESOLVER,
    PYTHON,
    V6_HOSTS,
    WORLD_V6,
    World,
)

pytestmark = pytest.mark.integration

AGENT = 1000
DNS_UID = 999  # codetainer-dns in the scratch root (codetainer/sandbox/scratchroot.py)
MACHINE_ID = "148e272c1d2e89"
NOTRACK = ("table ip6 fly_no_conntrack {\n"
           " chain pre { type filter hook prerouting priority raw; notrack; }\n"
           " chain out { type filter hook output priority raw; notrack; }\n}\n")
#: IPv6 destinations in the world with a TCP server behind them (codetainer/sandbox/world.py)
V6_TARGETS = ((FLY_OPERATOR, 443), (FLY_PEER, 80), (WORLD_V6, 443), (V6_HOSTS[0], 443),
              (FLY_RESOLVER, 53))
_LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1]))); s.listen(4); print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


def dig(world: World, server: str, name: str, uid: int) -> str:
    """One UDP query from the container's netns as ``uid``: the rcode, or TIMEOUT/ERROR."""
    out = world.run_in(world.inner, ["dig", "+time=1", "+tries=1", "+notcp", f"@{server}",
                                     name, "A"], uid=uid)
    m = re.search(r"status: ([A-Z]+)", out.stdout)
    return m[1] if m else ("TIMEOUT" if "timed out" in out.stdout else "ERROR")


class Keys:
    """A throwaway host key for the server and a client key, in the test's directory."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "ssh"
        self.root_ssh = self.dir / "root-ssh"  # bound read-only at /root/.ssh inside
        self.home = self.dir / "client-home"  # the client's $HOME (its known_hosts)
        for d in (self.root_ssh, self.home / ".ssh"):
            d.mkdir(parents=True, mode=0o700)
        self.host_key = base / "out" / "ssh_host_ed25519_key"  # /scratch-out inside
        self.client_key = self.dir / "client_ed25519"
        host_pub = self._keygen(self.host_key)
        (self.root_ssh / "authorized_keys").write_text(self._keygen(self.client_key) + "\n")
        (self.home / ".ssh" / "known_hosts").write_text(f"{FLY_MACHINE} {host_pub}\n")
        for f in (self.root_ssh / "authorized_keys", self.host_key):
            f.chmod(0o600)

    @staticmethod
    def _keygen(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(path)],
                             capture_output=True, text=True, check=True, timeout=30)
        pub = next(ln for ln in out.stdout.splitlines() if ln.startswith("ssh-ed25519 "))
        return " ".join(pub.split()[:2])

    def login(self, world: World, command: str) -> subprocess.CompletedProcess[str]:
        """``dbclient`` from the operator's 6PN address; the host key must match."""
        argv = ["env", "-i", f"HOME={self.home}", "PATH=/usr/bin:/bin", "dbclient", "-T",
                "-b", f"[{FLY_OPERATOR}]", "-i", str(self.client_key), f"root@{FLY_MACHINE}",
                command]
        return world.run_in(world.world, argv, timeout=30)


@pytest.fixture(scope="module")
def fly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, FullBoot, Keys]]:
    with World(ttl=60, fly=True) as world:
        publish_names(world, default_names())
        base = tmp_path_factory.mktemp("fly")
        os.chmod(base, 0o755)
        keys = Keys(base)
        # Before any firewall: every IPv6 target answers everyone (so a refusal later is
        # the firewall's doing).
        for host, port in V6_TARGETS:
            assert world.connect(host, port, uid=AGENT)[0] == "connected", (host, port)
        assert dig(world, FLY_RESOLVER, "probe.invalid", AGENT) in {"NOERROR", "NXDOMAIN"}
        # Fly's kernel: no IPv6 connection tracking in the Machine.
        assert world.run_in(world.inner, ["nft", "-f", "-"], input=NOTRACK).returncode == 0
        binds = ((str(keys.root_ssh), "/root/.ssh", True),)
        with full_boot(env={"FLY_MACHINE_ID": MACHINE_ID}, world=world, base=base,
                       binds=binds) as fb:
            st = fb.wait_boot(120)
            assert st["state"] == "READY", (st["reasons"], fb.log()[-3000:])
            with open(base / "dropbear.log", "wb") as sshd_log:
                sshd = subprocess.Popen(
                    fb.nsenter_argv("dropbear", "-F", "-E", "-s", "-p", "22", "-r",
                                    f"/scratch-out/{keys.host_key.name}"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sshd_log,
                )
            try:
                wait_for(lambda: world.run_in(world.inner, ["ss", "-Hltn", "sport = :22"]).stdout,
                         10, "dropbear listening on port 22")
                yield world, fb, keys
            finally:
                sshd.kill()  # nsenter; dropbear itself dies with the machine's PID namespace
                sshd.wait(10)


def test_status_says_fly_because_auto_found_a_fly_machine(fly: tuple[World, FullBoot, Keys]) -> None:
    _world, fb, _keys = fly
    net = fb.status()["network"]
    assert net["ipv6"] == "fly", net
    assert net["ipv6_reason"] == f"auto: FLY_MACHINE_ID set, {FLY_MACHINE} on ct0"
    codetainer = str(Path(sys.executable).parent / "codetainer")
    human = subprocess.run([codetainer, "--socket", fb.socket, "status"], capture_output=True,
                           text=True, timeout=30)
    assert f"IPv6 fly (auto: FLY_MACHINE_ID set, {FLY_MACHINE} on ct0)" in human.stdout, human.stdout
    as_json: dict[str, Any] = json.loads(subprocess.run(
        [codetainer, "--socket", fb.socket, "status", "--json"], capture_output=True, text=True,
        timeout=30).stdout)
    assert as_json["network"]["ipv6"] == "fly"
    assert any(e.get("event") == "network_ipv6_policy" and e.get("policy") == "fly"
               for e in fb.events())


def test_fly_ssh_console_path_logs_in_over_ipv6_without_conntrack(
    fly: tuple[World, FullBoot, Keys],
) -> None:
    world, _fb, keys = fly
    out = keys.login(world, "id -u")
    assert out.returncode == 0 and out.stdout.strip() == "0", (out.stdout, out.stderr)
    # Large output (many full-size segments) comes back whole, statelessly.
    out = keys.login(world, "head -c 300000 /dev/zero | tr '\\0' x")
    assert out.returncode == 0 and out.stdout == "x" * 300000, (len(out.stdout), out.stderr[-500:])
    # The IPv6 flows really are untracked (Fly's kernel), so the stateless rules carried it.
    rules = world.run_in(world.inner, ["nft", "list", "table", "ip6", "fly_no_conntrack"]).stdout
    assert rules.count("notrack") == 2


def test_the_agent_opens_no_ipv6_connection_and_the_dns_user_reaches_only_the_resolver(
    fly: tuple[World, FullBoot, Keys],
) -> None:
    world, _fb, _keys = fly
    for uid in (AGENT, 0):
        for host, port in V6_TARGETS:
            result, ms = world.connect(host, port, uid=uid)
            assert result == "ECONNREFUSED" and ms < 1000, (uid, host, port, result, ms)
    assert dig(world, FLY_RESOLVER, "probe.invalid", AGENT) in {"ERROR", "TIMEOUT"}
    # The DNS user: Fly's resolver on port 53, nothing else.
    assert dig(world, FLY_RESOLVER, "probe.invalid", DNS_UID) in {"NOERROR", "NXDOMAIN"}
    assert world.connect(FLY_RESOLVER, 53, uid=DNS_UID)[0] == "connected"  # DNS over TCP
    for host, port in V6_TARGETS[:-1]:
        assert world.connect(host, port, uid=DNS_UID)[0] == "ECONNREFUSED", (host, port)


def test_nothing_else_comes_in_over_ipv6(fly: tuple[World, FullBoot, Keys]) -> None:
    world, _fb, _keys = fly
    listener = world.spawn_in(world.inner, [PYTHON, "-I", "-c", _LISTEN, "2222"], uid=AGENT)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET6); s.settimeout(1); s.bind((sys.argv[1], 0))\n"
            "try:\n    s.connect((sys.argv[2], int(sys.argv[3]))); print('connected')\n"
            "except OSError as e: print(type(e).__name__)\n")
    for port in (2222, 53):
        out = world.python_in(world.world, code, FLY_OPERATOR, FLY_MACHINE, str(port))
        assert out.stdout.strip() == "TimeoutError", (port, out.stdout, out.stderr)
