"""The test world: real network namespaces, a real upstream DNS server, real servers.

::

    inner netns (the container)            world netns (the Internet, in miniature)
    ct0 198.51.100.2/24, fd00:ce::2/64 <-> ct1 198.51.100.1/24, fd00:ce::1/64
    default routes via the world             on lo: 203.0.113.10-40, 192.0.2.10-20, 192.0.2.53,
                                                    fd00:ce:1::10-11
                                             dnsmasq on 192.0.2.53 (authoritative, records
                                             changed at run time with ``set_records``)
                                             TCP servers on ports 80, 443, 8443, 22 of every
                                             host; UDP echo on 203.0.113.10:443

``World(fly=True)`` adds Fly's private network (6PN), as a Fly Machine sees it: the
container gets ``FLY_MACHINE`` (fdaa:0:1::2/48) on ct0, the world ``FLY_PEER`` on ct1 and
``FLY_OPERATOR`` and ``FLY_RESOLVER`` (fdaa::3, where its dnsmasq answers too) on lo.

The world has no route anywhere else and no link to the host. Use it as a context
manager (``with World() as w:``) or through the ``world`` fixture defined in a test
module (``yield from world_fixture()``). Every process started through it is tracked and
killed, and both namespaces are deleted on exit, also when setup fails half-way.
Namespaces, the veth pair, addresses, routes and neighbours are made over netlink
(pyroute2, imported only when a world starts); processes run in a namespace through
``ip netns exec``.

TCP servers: a request starting with ``GET``/``HEAD`` gets an HTTP 200 whose body is
``ADDR:PORT``; anything else is echoed back until the client closes (long-lived
connections for reload tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INNER_V4 = "198.51.100.2"
WORLD_V4 = "198.51.100.1"
INNER_V6 = "fd00:ce::2"
WORLD_V6 = "fd00:ce::1"
UPSTREAM = "192.0.2.53"
#: hosts an allowlist may name
ALLOWED_HOSTS = tuple(f"203.0.113.{i}" for i in range(10, 41))
#: hosts no test ever allowlists
NEVER_HOSTS = tuple(f"192.0.2.{i}" for i in range(10, 21))
V6_HOSTS = ("fd00:ce:1::10", "fd00:ce:1::11")
TCP_PORTS = (80, 443, 8443, 22)
UDP_ECHO = ("203.0.113.10", 443)
#: where the stand-in for Anthropic's API listens (apistandin.py): no generic server
API_HOST = "203.0.113.50"
PYTHON = "/usr/bin/python3"
# Fly's private network (6PN) under ``World(fly=True)``; fdaa::/16 lies inside fd00::/8.
FLY_MACHINE = "fdaa:0:1::2"  # the container's 6PN address, on ct0 (/48)
FLY_PEER = "fdaa:0:1::1"  # the world's end of the link, on ct1
FLY_OPERATOR = "fdaa:0:f1::1"  # `fly ssh console`, arriving over Fly's WireGuard (world lo)
FLY_RESOLVER = "fdaa::3"  # Fly's internal DNS: the world's dnsmasq answers there too
_RTPROT_BOOT = 3  # the routes' protocol, as `ip route add` sets it
_NUD_PERMANENT = 0x80

_HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3); print("up", flush=True)
for line in sys.stdin:
    s.sendall(line.encode()); print(s.recv(100).decode().strip(), flush=True)
"""

_SERVERS = r"""
import asyncio, json, sys
cfg = json.loads(sys.argv[1])
async def handle(reader, writer):
    host, port = writer.get_extra_info("sockname")[:2]
    try:
        first = await reader.read(4096)
        if first.startswith((b"GET ", b"HEAD ")):
            body = f"{host}:{port}\n".encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            while first:
                writer.write(first)
                await writer.drain()
                first = await reader.read(4096)
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
class Echo(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, data, addr): self.t.sendto(data, addr)
async def main():
    loop = asyncio.get_running_loop()
    servers = [await asyncio.start_server(handle, h, p, reuse_address=True, backlog=4096)
               for h in cfg["hosts"] for p in cfg["ports"]]
    for h, p in cfg["udp"]:
        await loop.create_datagram_endpoint(Echo, local_addr=(h, p))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

_PROBER = r"""
import errno, json, select, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
# Close with RST (linger 0): thousands of connections a second would otherwise pile up
# TIME_WAIT entries, and a SYN that collides with one is dropped and retried after 1 s,
# which would read as a firewall failure.
LINGER0 = struct.pack("ii", 1, 0)
counts = {f"{h}:{p}": {} for h, p in cfg["targets"]}
n = 0
while True:
    for h, p in cfg["targets"]:
        t = time.monotonic()
        try:
            s = socket.create_connection((h, p), timeout=cfg["timeout"])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
            s.close()
            r = "connected"
        except TimeoutError:
            r = "timeout"
        except OSError as e:
            r = errno.errorcode.get(e.errno or 0, "error")
        c = counts[f"{h}:{p}"]
        c[r] = c.get(r, 0) + 1
        ms = (time.monotonic() - t) * 1000
        c["max_ms"] = max(c.get("max_ms", 0.0), ms)
    n += 1
    if n == 1:
        print("ready", flush=True)
    if select.select([sys.stdin], [], [], cfg["interval"])[0]:
        break
print(json.dumps({"rounds": n, "counts": counts}), flush=True)
"""


@dataclass(frozen=True)
class _End:
    """One namespace's side of the veth pair, as data: what netlink sets up there."""

    ns: str
    dev: str  # its end of the veth pair
    addrs: tuple[str, ...]  # "address/prefix" on ``dev``
    lo_addrs: tuple[str, ...] = ()  # "address/prefix" on lo
    gateways: tuple[str, ...] = ()  # default routes via
    neighbours: tuple[str, ...] = ()  # the other end's addresses: static, with its MAC


def _plumb(inner: _End, world: _End) -> None:
    """Create the veth pair (``inner.dev`` in ``inner.ns``, ``world.dev`` in ``world.ns``)
    and set up both ends over netlink (pyroute2): loopback up, addresses (IPv6 ones with
    ``nodad``), links up, default routes, permanent neighbours. Raises RuntimeError naming
    the step that failed."""
    from pyroute2 import NetNS  # ~0.1 s to import: only where a world is built
    from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

    step = f"open {inner.ns} and {world.ns}"
    try:
        with NetNS(inner.ns, flags=0) as ipr_in, NetNS(world.ns, flags=0) as ipr_world:
            step = f"add veth {inner.dev} (in {inner.ns}) <-> {world.dev} (in {world.ns})"
            ipr_in.link("add", ifname=inner.dev, kind="veth",
                        peer={"ifname": world.dev, "net_ns_fd": world.ns})
            macs: dict[str, str] = {}
            for end, ipr in ((inner, ipr_in), (world, ipr_world)):
                lo, dev = ipr.link_lookup(ifname="lo")[0], ipr.link_lookup(ifname=end.dev)[0]
                step = f"{end.ns}: link set lo up"
                ipr.link("set", index=lo, state="up")
                for index, name, addrs in ((dev, end.dev, end.addrs), (lo, "lo", end.lo_addrs)):
                    for cidr in addrs:
                        step = f"{end.ns}: addr add {cidr} dev {name}"
                        addr, prefix = cidr.split("/")
                        v6 = ":" in addr
                        ipr.addr("add", index=index, address=addr, prefixlen=int(prefix),
                                 family=socket.AF_INET6 if v6 else socket.AF_INET,
                                 flags=IFA_F_NODAD if v6 else 0)
                step = f"{end.ns}: link set {end.dev} up"
                ipr.link("set", index=dev, state="up")
                for gw in end.gateways:
                    step = f"{end.ns}: route add default via {gw}"
                    v6 = ":" in gw
                    ipr.route("add", dst="::/0" if v6 else "0.0.0.0/0", gateway=gw,
                              family=socket.AF_INET6 if v6 else socket.AF_INET, proto=_RTPROT_BOOT)
                macs[end.ns] = str(ipr.get_links(dev)[0].get_attr("IFLA_ADDRESS"))
            # Static neighbours: IPv6 neighbour discovery on a fresh link costs the first
            # connection a 1 s SYN retransmit; tests measure milliseconds.
            for end, ipr, other in ((inner, ipr_in, world), (world, ipr_world, inner)):
                dev = ipr.link_lookup(ifname=end.dev)[0]
                for addr in end.neighbours:
                    step = f"{end.ns}: neigh replace {addr} lladdr {macs[other.ns]} dev {end.dev}"
                    ipr.neigh("replace", dst=addr, lladdr=macs[other.ns], ifindex=dev,
                              family=socket.AF_INET6 if ":" in addr else socket.AF_INET,
                              state=_NUD_PERMANENT)
    except Exception as exc:
        raise RuntimeError(f"building the test world over netlink failed at {step!r}: {exc}"
                           " (run as root; see `ip netns list` for leftovers)") from exc


#: seconds the world's netlink setup may take (it takes ~0.1 s)
NETLINK_DEADLINE_S = 30.0


def _off_loop(fn: Callable[[], None], deadline: float = NETLINK_DEADLINE_S) -> None:
    """Run ``fn`` in a worker thread and wait for it at most ``deadline`` seconds.

    A thread because pyroute2's sync API runs a loop of its own, which cannot start
    inside a running one (a benchmark may enter a World from a coroutine). A deadline
    because pyroute2 waits for a netlink answer without one: once, ``./dev sandbox`` hung
    in ``link add`` of the veth pair (pyroute2 0.9.7; not reproduced in 25 worlds after),
    and a world that cannot be built must fail, naming what, not hang. The thread is a
    daemon's: a hung one does not keep the process alive; the world's namespaces, where
    its socket lives, are removed by ``close``."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    worker = threading.Thread(target=run, name="world-netlink", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise RuntimeError(f"building the test world over netlink: no answer within "
                           f"{deadline:g} s (pyroute2); run it again, and see `ip netns list` "
                           "for leftovers")
    if failed:
        raise failed[0]


def _read_line(proc: subprocess.Popen[str], deadline: float, what: str) -> str:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.05)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line.strip()
            break
        if proc.poll() is not None:
            break
    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise RuntimeError(f"{what} did not start (exit {proc.poll()}): {err[-2000:]}")


class Prober:
    """A process in a namespace connecting to targets in a loop until :meth:`stop`."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """{"rounds": N, "counts": {"host:port": {"connected": n, "ECONNREFUSED": n, ...}}}."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        line = _read_line(self.proc, time.monotonic() + timeout, "prober result")
        self.proc.wait(timeout)
        return dict(json.loads(line))


class World:
    """Build with ``with World() as w``; ``w.inner`` and ``w.world`` are the netns names."""

    def __init__(self, *, ttl: int = 1, servers: bool = True, dns: bool = True,
                 fly: bool = False) -> None:
        """``fly``: add Fly's 6PN (FLY_* addresses above) to both ends, as on a Fly Machine."""
        suffix = secrets.token_hex(3)
        self.inner = f"ctin-{suffix}"
        self.world = f"ctw-{suffix}"
        self.ttl = ttl
        self._want_servers = servers
        self._want_dns = dns
        self.fly = fly
        self.procs: list[subprocess.Popen[Any]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="ctworld-"))
        self.hosts_file = self.dir / "hosts"
        self.records: dict[str, list[str]] = {}
        self.dns: subprocess.Popen[str] | None = None
        self._netns: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> World:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        for tool in ("ip", "dnsmasq", "nft", "setpriv"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"the test world needs {tool}: apt-get install it")
        from pyroute2 import netns

        for ns in (self.world, self.inner):
            try:
                netns.create(ns)
            except OSError as exc:
                raise RuntimeError(f"cannot create the network namespace {ns}: {exc} "
                                   "(the test world needs root)") from exc
            self._netns.append(ns)
            # No duplicate address detection: a tentative link-local address delays the
            # first IPv6 neighbour solicitation (and so the first connection) by a second.
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                 "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"],
                check=True, capture_output=True, timeout=10,
            )
        fly = self.fly
        lo_world = [f"{a}/32" for a in (*ALLOWED_HOSTS, *NEVER_HOSTS, UPSTREAM, API_HOST)]
        lo_world += [f"{a}/128" for a in V6_HOSTS]
        if fly:
            lo_world += [f"{a}/128" for a in (FLY_OPERATOR, FLY_RESOLVER)]
        inner = _End(self.inner, "ct0",
                     (f"{INNER_V4}/24", f"{INNER_V6}/64", *([f"{FLY_MACHINE}/48"] if fly else [])),
                     gateways=(WORLD_V4, WORLD_V6),
                     neighbours=(WORLD_V4, WORLD_V6, *([FLY_PEER] if fly else [])))
        world = _End(self.world, "ct1",
                     (f"{WORLD_V4}/24", f"{WORLD_V6}/64", *([f"{FLY_PEER}/48"] if fly else [])),
                     lo_addrs=tuple(lo_world),
                     neighbours=(INNER_V4, INNER_V6, *([FLY_MACHINE] if fly else [])))
        _off_loop(lambda: _plumb(inner, world))
        if self._want_servers:
            self._start_servers()
        if self._want_dns:
            self.hosts_file.write_text("")
            self._start_dns()

    def close(self) -> None:
        """Kill every process we started, then delete the namespaces; never raises."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()
        deadline = time.monotonic() + 3
        for proc in self.procs:
            try:
                proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._netns:
            from pyroute2 import netns

            # Anything still inside our namespaces was started by a test through them.
            try:
                inside = netns.ns_pids()
            except OSError:
                inside = {}
            for ns in self._netns:
                for pid in inside.get(ns, []):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                # Deleting a namespace deletes the veth end in it, and so the pair.
                with contextlib.suppress(OSError):
                    netns.remove(ns)
        self._netns.clear()
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- running things ----------------------------------------------------------------

    def argv_in(self, ns: str, argv: Sequence[str], *, uid: int | None = None) -> list[str]:
        """The command line that runs ``argv`` in ``ns`` (as ``uid``, with gid = uid)."""
        prefix = ["ip", "netns", "exec", ns]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return [*prefix, *argv]

    def run_in(
        self, ns: str, argv: Sequence[str], *, uid: int | None = None, timeout: float = 30,
        check: bool = False, input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv_in(ns, argv, uid=uid), capture_output=True, text=True, timeout=timeout,
            check=check, input=input,
        )

    def spawn_in(self, ns: str, argv: Sequence[str], *, uid: int | None = None) -> subprocess.Popen[str]:
        """Start a tracked process (pipes on stdin/stdout/stderr); killed on close."""
        proc = subprocess.Popen(
            self.argv_in(ns, argv, uid=uid),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(proc)
        return proc

    def python_in(
        self, ns: str, code: str, *args: str, uid: int | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.run_in(ns, [PYTHON, "-I", "-c", code, *args], uid=uid, timeout=timeout)

    def held_connection(self, host: str, port: int, *, uid: int | None = None) -> Callable[[str], str]:
        """One TCP connection from the inner netns, kept open (a tracked process); returns
        ``echo(word)``, which sends a line over it and returns what came back."""
        proc = self.spawn_in(self.inner, [PYTHON, "-I", "-c", _HOLD, host, str(port)], uid=uid)
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline().strip()
        if first != "up":
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"no connection to {host}:{port}: {first!r} {err}")

        def echo(word: str) -> str:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(word + "\n")
            proc.stdin.flush()
            return str(proc.stdout.readline()).strip()

        return echo

    def connect(
        self, host: str, port: int, *, uid: int | None = None, timeout: float = 3.0
    ) -> tuple[str, float]:
        """One TCP connect from the inner netns: ("connected" or errno name, milliseconds)."""
        code = (
            "import errno,socket,sys,time\n"
            "t=time.monotonic()\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))"
            ".close(); r='connected'\n"
            "except TimeoutError: r='timeout'\n"
            "except OSError as e: r=errno.errorcode.get(e.errno or 0,'error')\n"
            "print(r, (time.monotonic()-t)*1000)\n"
        )
        out = self.python_in(self.inner, code, host, str(port), str(timeout), uid=uid)
        result, ms = out.stdout.split()
        return result, float(ms)

    def prober(
        self, targets: Sequence[tuple[str, int]], *, interval: float = 0.0005,
        timeout: float = 1.0, uid: int | None = None,
    ) -> Prober:
        """Start a continuous connect loop in the inner netns; returns after its first round.

        Throttled by default: an unthrottled loop (~10k connections/s) overflows the world
        servers' accept queue (``TcpExtListenOverflows`` in the world netns), and the
        dropped SYN is retried after 1 s -- a "timeout" that has nothing to do with the
        firewall (measured with no firewall at all: 6 in 22k).
        """
        cfg = json.dumps({"targets": [list(t) for t in targets], "interval": interval,
                          "timeout": timeout})
        proc = self.spawn_in(self.inner, [PYTHON, "-I", "-c", _PROBER, cfg], uid=uid)
        if _read_line(proc, time.monotonic() + 10, "prober") != "ready":
            raise RuntimeError("prober did not report ready")
        return Prober(proc)

    # -- servers and DNS ---------------------------------------------------------------

    def _start_servers(self) -> None:
        fly = [FLY_OPERATOR, FLY_PEER] if self.fly else []
        cfg = json.dumps({"hosts": [*ALLOWED_HOSTS, *NEVER_HOSTS, *V6_HOSTS, WORLD_V6, *fly],
                          "ports": list(TCP_PORTS), "udp": [list(UDP_ECHO)]})
        proc = self.spawn_in(self.world, [PYTHON, "-I", "-c", _SERVERS, cfg])
        if _read_line(proc, time.monotonic() + 15, "world servers") != "ready":
            raise RuntimeError("world servers did not report ready")

    def _start_dns(self) -> None:
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", f"--addn-hosts={self.hosts_file}", f"--listen-address={UPSTREAM}",
            "--bind-interfaces", "--port=53", "--local=/#/", f"--local-ttl={self.ttl}",
            "--user=root", "--group=root", "--pid-file=", "--log-facility=-",
            "--cache-size=0",
        ]
        if self.fly:
            argv.append(f"--listen-address={FLY_RESOLVER}")
        self.dns = self.spawn_in(self.world, argv)
        self._wait_dns(None)

    def query(self, name: str, rtype: str = "A") -> list[str]:
        """Ask the world's DNS server directly (from the world netns)."""
        out = self.run_in(self.world, ["dig", "+short", "+time=1", "+tries=1", f"@{UPSTREAM}", name, rtype])
        if out.returncode != 0:
            raise RuntimeError(f"dig {name} failed: {out.stdout}{out.stderr}")
        return sorted(line for line in out.stdout.split() if line)

    def _wait_dns(self, check: tuple[str, list[str]] | None, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.dns is not None and self.dns.poll() is not None:
                raise RuntimeError(f"world dnsmasq exited: {self.dns.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            try:
                if check is None:
                    self.query("probe.invalid")
                    return
                name, want = check
                v4 = [a for a in want if ":" not in a]
                if self.query(name) == sorted(v4):
                    return
            except RuntimeError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"world dnsmasq did not answer as expected within {timeout}s ({check})")

    def set_records(
        self, name: str, ips: Sequence[str], ttl: int | None = None, *, wait: bool = True
    ) -> None:
        """Make the world's DNS answer ``name`` with ``ips`` (A and AAAA); [] removes it.

        The TTL is the server-wide ``--local-ttl``: a different ``ttl`` restarts dnsmasq.
        With ``wait`` the call returns once the server answers with the new addresses.
        """
        if ips:
            self.records[name] = list(ips)
        else:
            self.records.pop(name, None)
        lines = [f"{ip} {n}" for n, addrs in sorted(self.records.items()) for ip in addrs]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.hosts_file)
        assert self.dns is not None, "World(dns=False) has no DNS server"
        if ttl is not None and ttl != self.ttl:
            self.ttl = ttl
            self.dns.terminate()
            self.dns.wait(5)
            self._start_dns()
        else:
            self.dns.send_signal(signal.SIGHUP)
        if wait:
            self._wait_dns((name, list(ips)))


def world_fixture(**kwargs: Any) -> Iterator[World]:
    """Body of a pytest fixture: ``@pytest.fixture def world(): yield from world_fixture()``."""
    with World(**kwargs) as w:
        yield w
