"""The firewall's side of the policy proxy and the agent's DNS limits, real rules in the
test world's inner netns, both backends.

* Redirect: the agent's (uid 1000) TCP to ports 80/443 of allowed addresses arrives at
  the proxy's transparent port on loopback, with its original destination readable
  (``SO_ORIGINAL_DST``, what mitmproxy's transparent mode reads); another uid (the
  proxy's, root) goes direct; the agent's 80/443 that was not redirected is refused and
  recorded; with nothing on the transparent port the agent's HTTPS fails, never direct;
  a port an entry names besides 80/443 stays direct.
* DNS limits: the agent's over-long names and its queries past the budget are dropped
  on their way to the local DNS server (a real dnsmasq on 127.0.0.53); root's are not.

Each test shows its baseline first (no rule or another uid), so it cannot pass because
the world is broken.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest
from codetainer.network.firewall import DnsLimit, FirewallBackend, FirewallPolicy, self_test
from codetainer.network.firewall_ipt import NAT_CHAIN, iptables_tools
from codetainer.sandbox.world import (
    ALLOWED_HOSTS,
    NEVER_HOSTS,
    PYTHON,
    UPSTREAM,
    V6_HOSTS,
    World,
    world_fixture,
)

from tests.integration.test_firewall import AGENT, DNS_UID, applied, runner

pytestmark = pytest.mark.integration

BACKENDS = ["nftables", "iptables"]
PORT = 3129  # the proxy's transparent port (codetainer.proxy.model.TRANSPARENT_PORT)
PROXY_UID = 998  # stands in for the proxy's user: any uid but the agent's
NOBODY = 65534
A = ALLOWED_HOSTS[0]  # allowed on 80/443
B = ALLOWED_HOSTS[1]  # allowed on 8443 only: stays direct
C = ALLOWED_HOSTS[2]  # allowed on 443 and 8443 (an entry naming a port besides HTTP's)
D = ALLOWED_HOSTS[3]  # put in the DNS-filled set by the test
N = NEVER_HOSTS[0]
V6 = V6_HOSTS[0]

# The stand-in proxy: root, on the transparent port; answers every connection with
# "proxy" and prints its original destination.
_LISTENER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
v6 = ":" in host
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(16); print("ready", flush=True)
while True:
    c, _ = s.accept()
    raw = c.getsockopt(41 if v6 else 0, 80, 28 if v6 else 16)  # SO_ORIGINAL_DST
    addr = socket.inet_ntop(socket.AF_INET6, raw[8:24]) if v6 else socket.inet_ntoa(raw[4:8])
    print(f"{addr}:{int.from_bytes(raw[2:4], 'big')}", flush=True)
    c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\r\n\r\nproxy\n"); c.close()
"""

# One HTTP GET; prints the body's last line (the world's servers answer "ADDR:PORT") or
# the errno name.
_GET = r"""
import errno, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n"); data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.decode().strip().splitlines()[-1])
except TimeoutError:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno or 0, "error"))
"""


@pytest.fixture
def world() -> Iterator[World]:
    yield from world_fixture()


def policy(**kw: Any) -> FirewallPolicy:
    groups = kw.pop("groups", None) or {(80, 443): [A, V6], (8443,): [B], (443, 8443): [C], (443,): []}
    return FirewallPolicy.build(groups, dns_uid=DNS_UID, upstreams=[UPSTREAM], **kw)


def proxied(**kw: Any) -> FirewallPolicy:
    return policy(agent_uid=AGENT, proxy_port=PORT, **kw)


def get(world: World, host: str, port: int, uid: int | None = AGENT) -> str:
    out = world.python_in(world.inner, _GET, host, str(port), uid=uid)
    assert out.returncode == 0, out.stderr
    return str(out.stdout).strip()


class Listener:
    """The stand-in proxy on the transparent port, as root in the inner netns."""

    def __init__(self, world: World, host: str = "127.0.0.1") -> None:
        self.proc = world.spawn_in(world.inner, [PYTHON, "-I", "-c", _LISTENER, host, str(PORT)])
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def original(self) -> str:
        """The original destination of the connection it accepted last."""
        assert self.proc.stdout is not None
        return str(self.proc.stdout.readline()).strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def nat_rules(world: World, backend: str, version: int = 4) -> list[str]:
    """The redirect rules of one family in the kernel, and the nat jump (iptables)."""
    if backend == "nftables":
        out = world.run_in(world.inner, ["nft", "list", "chain", "inet", "codetainer", "to_proxy"])
        daddr = "ip daddr @" if version == 4 else "ip6 daddr @"
        return [line.strip() for line in out.stdout.splitlines() if "redirect" in line and daddr in line]
    ipt = iptables_tools()[0 if version == 4 else 2]
    out = world.run_in(world.inner, [ipt, "-w", "-t", "nat", "-S"])
    return [line for line in out.stdout.splitlines() if NAT_CHAIN in line]


# -- the redirect --------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_agent_https_goes_to_the_proxy_others_go_direct(world: World, backend_name: str) -> None:
    assert get(world, A, 443) == f"{A}:443"  # baseline: the world answers
    proxy = Listener(world)
    backend = await applied(world, backend_name, proxied())
    # The agent's connection arrives on the transparent port, for where it was going.
    assert get(world, A, 443) == "proxy"
    assert proxy.original() == f"{A}:443"
    assert get(world, A, 80) == "proxy"
    assert proxy.original() == f"{A}:80"
    assert get(world, C, 443) == "proxy"  # an entry with another port: its 443 proxied too
    assert proxy.original() == f"{C}:443"
    # The proxy's user and root reach the allowed address themselves.
    assert get(world, A, 443, uid=PROXY_UID) == f"{A}:443"
    assert get(world, A, 443, uid=0) == f"{A}:443"
    # Ports an entry names besides 80/443 stay direct, for the agent too.
    assert get(world, B, 8443) == f"{B}:8443"
    assert get(world, C, 8443) == f"{C}:8443"
    assert get(world, B, 443, uid=PROXY_UID) == "ECONNREFUSED"  # B is allowed on 8443 only
    # An address no entry allows: refused as before, for everyone, and recorded.
    assert get(world, N, 443) == "ECONNREFUSED"
    assert get(world, B, 443) == "ECONNREFUSED"
    assert get(world, N, 443, uid=PROXY_UID) == "ECONNREFUSED"
    denied = {(d.addr, d.proto, d.port) for d in await backend.read_denied()}
    assert {(N, "tcp", 443), (B, "tcp", 443)} <= denied
    # The proxy down: the agent's HTTPS fails at once, it never goes direct.
    proxy.stop()
    assert get(world, A, 443) == "ECONNREFUSED"
    assert world.connect(A, 80, uid=AGENT)[0] == "ECONNREFUSED"
    assert get(world, A, 443, uid=PROXY_UID) == f"{A}:443"


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_dns_filled_addresses_are_redirected_too(world: World, backend_name: str) -> None:
    proxy = Listener(world)
    await applied(world, backend_name, proxied())
    assert get(world, D, 443) == "ECONNREFUSED"  # not allowed yet
    add = (["nft", f"add element inet codetainer d4_80_443 {{ {D} }}"] if backend_name == "nftables"
           else ["ipset", "add", "ct-d4_80_443", D])
    assert world.run_in(world.inner, add).returncode == 0
    assert get(world, D, 443) == "proxy"
    assert proxy.original() == f"{D}:443"
    assert get(world, D, 443, uid=PROXY_UID) == f"{D}:443"


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_ipv6_redirect_only_where_ipv6_is_allowlisted(world: World, backend_name: str) -> None:
    proxy = Listener(world, "::1")
    await applied(world, backend_name, proxied(ipv6="allowlist"))
    assert get(world, V6, 443) == "proxy"
    assert proxy.original() == f"{V6}:443"
    assert get(world, V6, 443, uid=PROXY_UID) == f"{V6}:443"
    assert get(world, V6_HOSTS[1], 443) == "ECONNREFUSED"
    assert any("s6_80_443" in line for line in nat_rules(world, backend_name, 6))
    await applied(world, backend_name, proxied(ipv6="deny"))
    assert get(world, V6, 443) == "ECONNREFUSED"  # IPv6 denied: no redirect either
    assert get(world, V6, 443, uid=PROXY_UID) == "ECONNREFUSED"
    assert nat_rules(world, backend_name, 6) == []  # the IPv6 redirect is gone
    assert nat_rules(world, backend_name, 4) != []


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_proxy_off_removes_the_redirect_teardown_all(world: World, backend_name: str) -> None:
    Listener(world)
    backend: FirewallBackend = await applied(world, backend_name, proxied())
    first = nat_rules(world, backend_name)
    assert any("3129" in line for line in first)
    await backend.apply(proxied())  # re-applied: the nat side is replaced, not doubled
    assert nat_rules(world, backend_name) == first
    if backend_name == "iptables":
        assert first.count("-A OUTPUT -j CODETAINER-NAT") == 1
    assert get(world, A, 443) == "proxy"
    await backend.apply(policy())  # proxy off: the agent goes direct again
    assert nat_rules(world, backend_name) == []
    if backend_name == "nftables":
        chains = world.run_in(world.inner, ["nft", "list", "chains", "inet"]).stdout
        assert "to_proxy" not in chains
    assert get(world, A, 443) == f"{A}:443"
    await backend.apply(proxied())
    assert get(world, A, 443) == "proxy"
    await backend.teardown()
    assert nat_rules(world, backend_name) == []
    assert get(world, N, 443) == f"{N}:443"  # nothing of ours left


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_selftest_proves_the_redirect(world: World, backend_name: str) -> None:
    """At boot the self-test runs before the proxy starts: it holds the transparent port
    itself and checks that the agent's connection lands there for the allowed target."""
    r = runner(world)
    backend = await applied(world, backend_name, policy())  # no redirect: must be told
    bad = await self_test(AGENT, AGENT, (A, 443), (N, 443), [UPSTREAM], runner=r, redirect_port=PORT)
    assert bad.allowed == "connected" and bad.redirected == ""
    assert any("not redirected" in p for p in bad.problems())
    await backend.apply(proxied())
    good = await self_test(AGENT, AGENT, (A, 443), (N, 443), [UPSTREAM], runner=r, redirect_port=PORT)
    assert good.problems() == [] and good.redirected == f"{A}:443"
    # A probe port the proxy does not take is not checked (and connects direct).
    direct = await self_test(AGENT, AGENT, (B, 8443), (N, 443), [UPSTREAM], runner=r, redirect_port=PORT)
    assert direct.problems() == [] and direct.redirected is None


# -- the agent's DNS limits ----------------------------------------------------------------

LISTEN = "127.0.0.53"

# Sends queries (argv: a JSON list of [name, proto]) to the local server and prints, per
# query, whether an answer came: UDP all at once from one socket, then each TCP one.
_QUERIES = r"""
import json, select, socket, struct, sys, time
def query(i, name):
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)
qs = json.loads(sys.argv[1]); server = (sys.argv[2], 53)
got = [False] * len(qs)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(server)
for i, (name, proto) in enumerate(qs):
    if proto == "udp":
        try:
            u.send(query(i, name))
        except PermissionError:  # dropped in the output path: the kernel says so at once
            pass
deadline, want = time.monotonic() + 1.5, sum(proto == "udp" for _, proto in qs)
while sum(got) < want and select.select([u], [], [], max(0, deadline - time.monotonic()))[0]:
    got[struct.unpack("!H", u.recv(4096)[:2])[0]] = True
for i, (name, proto) in enumerate(qs):
    if proto == "tcp":
        try:
            t = socket.create_connection(server, 1.5)
            q = query(i, name); t.sendall(struct.pack("!H", len(q)) + q)
            got[i] = len(t.recv(4096)) > 2
        except OSError:
            pass
print(json.dumps(got))
"""


# Writes argv[2] queries with names at the bound (100) in one TCP segment; prints how
# many answers came, or "timeout".
_PIPELINE = r"""
import socket, struct, sys
def query(i, name):
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q = struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)
    return struct.pack("!H", len(q)) + q
n = int(sys.argv[2])
name = ".".join(["p" * 60, "q" * 26, "pipe", "test"])
s = socket.create_connection((sys.argv[1], 53), 1.5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"".join(query(i, name) for i in range(n)))
got = 0
try:
    for _ in range(n):
        size = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
        s.recv(size, socket.MSG_WAITALL)
        got += 1
    print(got)
except TimeoutError:
    print("timeout")
"""


def name_of(length: int, tag: str) -> str:
    """A name of exactly ``length`` characters under limit.test (labels of at most 60)."""
    suffix = f".{tag}.limit.test"
    left, labels = length - len(suffix), []
    while left > 0:
        n = min(60, left) - (left - min(60, left) == 1)  # never leave a lone dot
        labels.append("x" * n)
        left -= n + 1
    name = ".".join(labels) + suffix
    assert len(name) == length
    return name


def answered(world: World, queries: list[tuple[str, str]], uid: int | None) -> list[bool]:
    out = world.python_in(world.inner, _QUERIES, json.dumps(queries), LISTEN, uid=uid)
    assert out.returncode == 0, out.stderr
    return [bool(x) for x in json.loads(out.stdout)]


@pytest.fixture
def local_dns(world: World) -> World:
    """A real dnsmasq on 127.0.0.53 in the inner netns, forwarding to the world's server
    as the DNS user (nobody), no cache: every query goes upstream."""
    world.spawn_in(world.inner, [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        f"--listen-address={LISTEN}", "--bind-interfaces", f"--server={UPSTREAM}", "--user=nobody",
        "--pid-file=", "--log-facility=-", "--cache-size=0"])
    probe = world.run_in(world.inner, ["dig", "+short", "+tries=5", "+time=1", f"@{LISTEN}", "probe.test"])
    assert probe.returncode == 0, probe.stdout + probe.stderr
    return world


def limited(rate: int = 5, burst: int = 10, max_name: int = 100, **kw: Any) -> FirewallPolicy:
    return FirewallPolicy.build({(80, 443): [A]}, dns_uid=NOBODY, upstreams=[UPSTREAM], agent_uid=AGENT,
                                dns_limit=DnsLimit(ipaddress.ip_address(LISTEN), rate, burst, max_name),
                                **kw)


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_agent_names_longer_than_the_bound_are_dropped(local_dns: World, backend_name: str) -> None:
    """Bound 100 characters: with dig's EDNS record and cookie (the most a stub adds) a
    name of 100 passes; a bare query (glibc) may carry 23 more, not 24."""
    world = local_dns
    at = name_of(100, "at")
    fits, over = name_of(123, "fits"), name_of(124, "over")
    udp = [(fits, "udp"), (over, "udp")]
    assert answered(world, [*udp, (over, "tcp"), (name_of(250, "long"), "tcp")], AGENT) == [True] * 4
    await applied(world, backend_name, limited(rate=1000, burst=1000))
    assert answered(world, udp, AGENT) == [True, False]
    assert answered(world, udp, 0) == [True, True]  # root's are not the agent's
    world.set_records(at, [A])
    for proto in ("+notcp", "+tcp"):
        dig = world.run_in(world.inner, ["dig", "+short", "+time=1", "+tries=1", proto, f"@{LISTEN}", at],
                           uid=AGENT)
        assert dig.stdout.split() == [A], proto
    # TCP: a segment holds at most two such queries (one name of any length fits).
    assert answered(world, [(over, "tcp"), (name_of(250, "long"), "tcp")], AGENT) == [True, True]
    pipelined = world.python_in(world.inner, _PIPELINE, LISTEN, "3", uid=AGENT)
    assert pipelined.stdout.split() == ["timeout"], pipelined.stderr
    assert world.python_in(world.inner, _PIPELINE, LISTEN, "2", uid=AGENT).stdout.split() == ["2"]
    assert world.python_in(world.inner, _PIPELINE, LISTEN, "3", uid=0).stdout.split() == ["3"]


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_agent_queries_past_the_budget_are_dropped(local_dns: World, backend_name: str) -> None:
    world = local_dns
    burst = [(f"n{i}.burst.limit.test", "udp") for i in range(60)]
    assert all(answered(world, burst, AGENT))  # baseline: the server answers all 60
    await applied(world, backend_name, limited(rate=5, burst=10))
    got = answered(world, [(f"m{i}.burst.limit.test", "udp") for i in range(60)], AGENT)
    # The burst, and what the rate refills while they go out (iptables counts the burst
    # from a refill at the first packet): far fewer than sent.
    assert 10 <= sum(got) <= 20, sum(got)
    assert got[:10] == [True] * 10
    assert all(answered(world, [(f"r{i}.burst.limit.test", "udp") for i in range(60)], 0))  # root
    assert all(answered(world, [(f"p{i}.burst.limit.test", "udp") for i in range(60)], PROXY_UID))
