"""Nothing comes in: the input side of the firewall, real rules in the test world's netns.

The attack this closes: a host that can reach the container (a Docker bridge neighbour,
the host, another Machine on Fly's private network) connects to a port the agent
(uid 1000) listens on and the two exchange data past the allowlist. Each test first
shows the attack working without the firewall, so it cannot pass because the world is
broken. Probes from the world run in parallel threads of one process, each with a short
deadline: a refused probe costs its timeout once per batch, and no test sleeps.
"""

from __future__ import annotations

import json
import select
from collections.abc import Iterator, Sequence

import pytest
from codetainer.network.firewall import FirewallPolicy
from codetainer.network.firewall_ipt import iptables_tools
from codetainer.sandbox.world import (
    ALLOWED_HOSTS,
    INNER_V4,
    INNER_V6,
    NEVER_HOSTS,
    PYTHON,
    UDP_ECHO,
    UPSTREAM,
    V6_HOSTS,
    WORLD_V4,
    WORLD_V6,
    World,
    world_fixture,
)

from tests.integration.test_firewall import AGENT, DNS_UID, FLY_MACHINE, FLY_OPERATOR, FLY_RESOLVER, applied

pytestmark = pytest.mark.integration

BACKENDS = ["nftables", "iptables"]
A = ALLOWED_HOSTS[0]
N = NEVER_HOSTS[0]
PUBLISHED = ("tcp/8080", "udp/8081")
#: the agent also listens here, unpublished: the attack's targets
CLOSED_TCP, CLOSED_UDP = 8090, 8091
#: who attacks: the bridge neighbour (the host, in Docker) and a host further away, per family
ATTACKERS = {INNER_V4: (WORLD_V4, N), INNER_V6: (WORLD_V6, V6_HOSTS[1])}

# The agent's listener: TCP and UDP on "::" (both families), answers "agent:" + what it
# got and records every connection and datagram; "dump" on stdin prints the record once
# every socket that is readable has been read (what the kernel delivered is in the queues).
_AGENT_SERVER = r"""
import json, select, socket, sys
socks, conns, events = {}, {}, []
for proto, port, *host in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host[0] if host else "::", port))
    if proto == "tcp":
        s.listen(16)
    socks[s] = (proto, port)
def serve(timeout):
    ready = select.select([*socks, *conns], [], [], timeout)[0]
    for s in ready:
        try:
            if s in socks and socks[s][0] == "tcp":
                c, addr = s.accept()
                conns[c] = socks[s][1]
                events.append(["tcp", socks[s][1], addr[0].removeprefix("::ffff:")])
            elif s in socks:
                data, addr = s.recvfrom(4096)
                events.append(["udp", socks[s][1], addr[0].removeprefix("::ffff:")])
                s.sendto(b"agent:" + data, addr)
            else:
                data = s.recv(4096)
                if not data:
                    del conns[s]; s.close()
                    continue
                s.sendall(b"agent:" + data)
        except OSError:  # an answer the firewall refused, a reset connection
            if s in conns:
                del conns[s]; s.close()
    return bool(ready)
print("ready", flush=True)
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        if not sys.stdin.readline():
            break
        while serve(0):
            pass
        print(json.dumps(events), flush=True)
        events.clear()
    serve(0.02)
"""

# World-side clients, all at once: [proto, source address or "", destination, port] each.
_PROBES = r"""
import errno, json, socket, sys, threading
probes, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
out = [""] * len(probes)
def one(i, proto, src, dst, port):
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET,
                      socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    msg, stage = f"probe {i}".encode(), "connect"
    try:
        if src:
            s.bind((src, 0))
        if proto == "tcp":
            s.connect((dst, port)); stage = "silent"; s.sendall(msg)
        else:
            s.sendto(msg, (dst, port))
        data = s.recv(100)
        out[i] = "exchanged" if data == b"agent:" + msg else f"got {data!r}"
    except TimeoutError:
        out[i] = "timeout" if stage == "connect" else stage
    except OSError as e:
        out[i] = errno.errorcode.get(e.errno or 0, "error")
    finally:
        s.close()
threads = [threading.Thread(target=one, args=(i, *p)) for i, p in enumerate(probes)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


@pytest.fixture
def world() -> Iterator[World]:
    yield from world_fixture()


class AgentServer:
    """The agent's listener (a tracked process in the inner netns)."""

    def __init__(
        self, world: World, ports: Sequence[tuple[str, int] | tuple[str, int, str]], *,
        uid: int | None = AGENT, ns: str = "",
    ) -> None:
        argv = [PYTHON, "-I", "-c", _AGENT_SERVER, json.dumps(ports)]
        self.proc = world.spawn_in(ns or world.inner, argv, uid=uid)
        assert self._line(10) == "ready"

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError(f"agent server silent for {timeout}s (exit {self.proc.poll()})")
        line = self.proc.stdout.readline().strip()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"agent server exited {self.proc.poll()}: {err[-2000:]}")
        return line

    def received(self) -> set[tuple[str, int, str]]:
        """(proto, port, peer) of everything that reached the agent since the last call."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("dump\n")
        self.proc.stdin.flush()
        return {(p, port, peer) for p, port, peer in json.loads(self._line(10))}


def probe(world: World, probes: Sequence[tuple[str, str, str, int]], timeout: float = 1.5) -> list[str]:
    """Run the probes from the world at once: "exchanged", "timeout" (nothing came back),
    "silent" (TCP connected, no answer) or an errno name, in order."""
    out = world.python_in(world.world, _PROBES, json.dumps(probes), str(timeout))
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def attack(port_tcp: int, port_udp: int) -> list[tuple[str, str, str, int]]:
    """Every attacker to both of the container's addresses, TCP and UDP."""
    return [(proto, src, dst, port) for dst, srcs in ATTACKERS.items() for src in srcs
            for proto, port in (("tcp", port_tcp), ("udp", port_udp))]


def policy(**kw: object) -> FirewallPolicy:
    groups = {(80, 443): [A, V6_HOSTS[0]]}
    return FirewallPolicy.build(groups, dns_uid=DNS_UID, upstreams=[UPSTREAM], ipv6="allowlist", **kw)  # type: ignore[arg-type]


def from_port(world: World, proto: str, sport: int, host: str, port: int) -> str:
    """The agent opening a connection *from* a published port (riding its reply rule?)."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(type=socket.SOCK_STREAM if sys.argv[1] == 'tcp' else socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.settimeout(1.5)\n"
        "s.bind(('0.0.0.0', int(sys.argv[2])))\n"
        "try:\n"
        "    s.connect((sys.argv[3], int(sys.argv[4]))); s.send(b'x'); s.recv(10); print('answered')\n"
        "except TimeoutError: print('timeout')\n"
        "except OSError as e: print(errno.errorcode.get(e.errno or 0, 'error'))\n"
    )
    out = world.python_in(world.inner, code, proto, str(sport), host, str(port), uid=AGENT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def unhook_input(world: World, backend_name: str) -> None:
    """Take our input chain out of the path (only ours, only in the test's netns)."""
    if backend_name == "nftables":
        cmds = [["nft", "delete chain inet codetainer input"]]
    else:
        tools = iptables_tools()
        cmds = [[ipt, "-w", "-D", "INPUT", "-j", "CODETAINER-IN"] for ipt in (tools[0], tools[2])]
    for cmd in cmds:
        r = world.run_in(world.inner, cmd)
        assert r.returncode == 0, r.stderr


# -- the attack, and what must keep working -------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_nothing_comes_in_but_published_ports(world: World, backend_name: str) -> None:
    server = AgentServer(world, [("tcp", 8080), ("udp", 8081), ("tcp", CLOSED_TCP), ("udp", CLOSED_UDP)])
    hostile = attack(CLOSED_TCP, CLOSED_UDP)
    # Baseline, no firewall: every attacker reaches the agent and gets answers.
    assert probe(world, hostile) == ["exchanged"] * len(hostile)
    assert len(server.received()) == len(hostile)

    backend = await applied(world, backend_name, policy(inbound=PUBLISHED))
    published = attack(8080, 8081)
    results = probe(world, hostile + published)
    assert results[: len(hostile)] == ["timeout"] * len(hostile), list(zip(hostile, results, strict=False))
    assert results[len(hostile) :] == ["exchanged"] * len(published)
    # Not one SYN-completed connection or datagram reached the agent on its other ports.
    got = server.received()
    assert {(proto, port) for proto, port, _peer in got} == {("tcp", 8080), ("udp", 8081)}
    assert {peer for _p, _port, peer in got} == {src for srcs in ATTACKERS.values() for src in srcs}

    # The container's own connections: both families, data both ways.
    for host in (A, V6_HOSTS[0]):
        echo = world.held_connection(host, 443, uid=AGENT)
        assert echo("there") == "there" and echo("and back") == "and back"
    # Nothing published: the published ports are closed too.
    await backend.apply(policy())
    assert probe(world, published) == ["timeout"] * len(published)
    assert server.received() == set()


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_a_published_port_is_no_way_out(world: World, backend_name: str) -> None:
    """The answers a published port may send are no way out: a flow the agent opens
    *from* that port is new, original direction, and as denied as any other."""
    assert from_port(world, "tcp", 8080, NEVER_HOSTS[1], 443) == "answered"  # baseline
    await applied(world, backend_name, policy(inbound=PUBLISHED))
    assert from_port(world, "tcp", 8080, N, 443) == "ECONNREFUSED"
    assert from_port(world, "udp", 8081, *UDP_ECHO) in {"EPERM", "timeout"}
    assert from_port(world, "tcp", 8080, A, 443) == "answered"  # allowlisted: as ever


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_output_alone_never_answers_a_connection_from_outside(world: World, backend_name: str) -> None:
    """Defence in depth: with our input chain taken out of the path, the output's
    conntrack shortcut (the container's own connections only) still answers nothing."""
    server = AgentServer(world, [("tcp", 8080), ("udp", 8081), ("tcp", CLOSED_TCP), ("udp", CLOSED_UDP)])
    await applied(world, backend_name, policy(inbound=PUBLISHED))
    unhook_input(world, backend_name)
    hostile, published = attack(CLOSED_TCP, CLOSED_UDP), attack(8080, 8081)
    results = probe(world, hostile + published)
    assert results[: len(hostile)] == ["timeout"] * len(hostile), list(zip(hostile, results, strict=False))
    assert results[len(hostile) :] == ["exchanged"] * len(published)
    # No TCP handshake completed to a closed port (the SYN-ACK never left); datagrams did
    # arrive one way, which is what the input chain is there for.
    got = {(p, port) for p, port, _peer in server.received()}
    assert ("tcp", CLOSED_TCP) not in got and ("udp", CLOSED_UDP) in got
    assert world.held_connection(A, 443, uid=AGENT)("still") == "still"


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_related_icmp_errors_reach_the_container(world: World, backend_name: str) -> None:
    """Replies include their ICMP errors (related, reply direction): a query to a host
    with nothing on port 53 fails at once (port unreachable), in both families."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(1.5); s.connect((sys.argv[1], 53)); s.send(b'q')\n"
        "try:\n"
        "    s.recv(10); print('answered')\n"
        "except TimeoutError: print('timeout')\n"
        "except OSError as e: print(errno.errorcode.get(e.errno or 0, 'error'))\n"
    )
    dead = (N, V6_HOSTS[1])  # world hosts without a DNS server

    def query(host: str) -> str:
        out = world.python_in(world.inner, code, host, uid=DNS_UID)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert [query(h) for h in dead] == ["ECONNREFUSED"] * 2  # baseline
    pol = FirewallPolicy.build({(443,): [A]}, dns_uid=DNS_UID, upstreams=[UPSTREAM, *dead])
    await applied(world, backend_name, pol)
    assert [query(h) for h in dead] == ["ECONNREFUSED"] * 2


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_ipv6_neighbour_discovery_passes(world: World, backend_name: str) -> None:
    """On-link IPv6 peers without static neighbour entries: solicitations and
    advertisements pass both chains, both ways (inbound to a published port, outbound to
    an allowlisted host)."""
    peer, me = "fd00:ce::5", "fd00:ce::6"
    world.run_in(world.world, ["ip", "addr", "add", f"{peer}/64", "dev", "ct1", "nodad"], check=True)
    world.run_in(world.inner, ["ip", "addr", "add", f"{me}/64", "dev", "ct0", "nodad"], check=True)
    AgentServer(world, [("tcp", 8080)])
    AgentServer(world, [("tcp", 443, peer)], uid=None, ns=world.world)
    groups = {(80, 443): [A, peer]}
    pol = FirewallPolicy.build(groups, dns_uid=DNS_UID, upstreams=[UPSTREAM], ipv6="allowlist",
                               inbound=["tcp/8080"])
    await applied(world, backend_name, pol)
    # Outbound first (the container solicits the peer), then inbound (the peer solicits us).
    assert world.connect(peer, 443, uid=AGENT)[0] == "connected"
    assert probe(world, [("tcp", peer, me, 8080)], timeout=3) == ["exchanged"]
    for ns, addr in ((world.world, me), (world.inner, peer)):
        neigh = world.run_in(ns, ["ip", "-6", "neigh", "show", addr]).stdout
        assert "lladdr" in neigh and "PERMANENT" not in neigh, neigh  # learnt by ND


# -- Fly: stateless SSH from the private network, nothing else -------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_fly_ssh_comes_in_statelessly_and_nothing_else(world: World, backend_name: str) -> None:
    world.run_in(world.world, ["ip", "addr", "add", f"{FLY_OPERATOR}/128", "dev", "lo"], check=True)
    world.run_in(world.world, ["ip", "route", "add", f"{FLY_MACHINE}/128", "via", INNER_V6], check=True)
    world.run_in(world.inner, ["ip", "addr", "add", f"{FLY_MACHINE}/128", "dev", "lo"], check=True)
    sshd = AgentServer(world, [("tcp", 22)], uid=None)  # the machine's sshd (root)
    agent = AgentServer(world, [("tcp", 2222), ("udp", 2223)])
    ssh = [("tcp", FLY_OPERATOR, FLY_MACHINE, 22)]
    hostile = [("tcp", FLY_OPERATOR, FLY_MACHINE, 2222), ("udp", FLY_OPERATOR, FLY_MACHINE, 2223)]
    assert probe(world, ssh + hostile) == ["exchanged"] * 3  # baseline: no firewall
    assert len(agent.received()) == 2 and len(sshd.received()) == 1
    # Be in Fly's position: no IPv6 connection tracking (every IPv6 packet untracked).
    notrack = ("table ip6 fly_no_conntrack {\n"
               " chain pre { type filter hook prerouting priority raw; notrack; }\n"
               " chain out { type filter hook output priority raw; notrack; }\n}\n")
    assert world.run_in(world.inner, ["nft", "-f", "-"], input=notrack).returncode == 0
    pol = FirewallPolicy.build({(80, 443): [A]}, dns_uid=DNS_UID, upstreams=[UPSTREAM, FLY_RESOLVER],
                               ipv6="fly", inbound=["tcp/2222"])
    await applied(world, backend_name, pol)
    # Even published: without conntrack a reply cannot be told from a new flow, so no
    # published port answers in Fly's IPv6 (IPv4 is tracked and does).
    assert probe(world, ssh + hostile) == ["exchanged", "timeout", "timeout"]
    assert sshd.received() == {("tcp", 22, FLY_OPERATOR)}
    assert probe(world, [("tcp", WORLD_V4, INNER_V4, 2222)]) == ["exchanged"]
    assert agent.received() == {("tcp", 2222, WORLD_V4)}
