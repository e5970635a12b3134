"""Both DNS engines for real, run from our generated configs, in a fresh network namespace.

Every test that depends on the engine runs twice (``engine``): dnsmasq 2.90 from its
generated config, filling the kernel sets itself (``nftset=``/``ipset=``), and CoreDNS
(the Dockerfile's pin, built by ``./dev setup``) from its generated Corefile, forwarding
the allowlisted zones to the daemon's hook (:class:`~codetainer.network.dnshook.DnsHook`,
run here in its own process in the namespace), which fills the sets before it replies.

A dnsmasq on 127.0.0.2 in the same namespace is the "upstream": it answers for every
test name (including the subdomains and names we must refuse), so a refusal can only
come from our config. The nft table ``inet codetainer`` with the dynamic sets lives in
the namespace too; we check that answered addresses land in it (the zero-race path:
the server inserts before it replies), and that answers pointing at internal addresses
(DNS rebinding under an allowlisted wildcard) never do. Internal addresses are only
ever *answers* here: nothing connects anywhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from codetainer.network import dnscheck
from codetainer.network.allowlist import Allowlist, parse_text
from codetainer.network.dnsconfig import (
    COREDNS_BIN,
    DnsOptions,
    Engine,
    GeneratedConfig,
    SetBackend,
    dnsmasq_version,
    exec_script,
    parse_coredns_log_line,
    parse_dnsmasq_log_line,
    parse_upstreams,
    render_corefile,
    render_dnsmasq,
)
from codetainer.network.dnsplan import DnsPlan, DynamicSet

pytestmark = pytest.mark.integration

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
ROOT = Path(__file__).resolve().parents[2]
ENGINES = [Engine.COREDNS, Engine.DNSMASQ]
#: the cap of the TTL told to clients in these tests; the upstream says 60
MAX_TTL = 30

UPSTREAM_CONF = """\
pid-file=
no-resolv
no-hosts
listen-address=127.0.0.2
bind-interfaces
local-ttl=60
address=/allowed.test/203.0.113.10
address=/allowed.test/2001:db8::10
address=/wild.test/203.0.113.20
address=/wild.test/2001:db8::20
address=/denied.test/203.0.113.30
host-record=target.cdn.test,203.0.113.40
cname=alias.test,target.cdn.test
address=/ports.test/203.0.113.50
address=/fd.wild.test/203.0.113.21
address=/fd.wild.test/fd00:ce:1::10
host-record=mixed.wild.test,203.0.113.22
host-record=mixed.wild.test,10.9.9.9
cname=cn.wild.test,inside.other.test
host-record=inside.other.test,10.7.7.7
address=/tcp.wild.test/172.31.255.255
address=/cidr.wild.test/10.1.2.3
"""

#: an attacker's records under the allowlisted ``*.wild.test``, one per internal range
#: class of model.INTERNAL (the upstream answers them; our server must not)
REBIND = {
    "meta.wild.test": ("A", "169.254.169.254"),
    "ten.wild.test": ("A", "10.1.2.3"),
    "cgnat.wild.test": ("A", "100.64.1.1"),
    "lo.wild.test": ("A", "127.0.0.1"),
    "r192.wild.test": ("A", "192.168.1.1"),
    "r172.wild.test": ("A", "172.16.0.1"),
    "zero.wild.test": ("A", "0.1.2.3"),
    "mcast.wild.test": ("A", "224.0.0.251"),
    "resv.wild.test": ("A", "240.0.0.1"),
    "ll6.wild.test": ("AAAA", "fe80::1"),
    "lo6.wild.test": ("AAAA", "::1"),
    "mapped6.wild.test": ("AAAA", "::ffff:169.254.169.254"),
    "fly6.wild.test": ("AAAA", "fdaa::3"),
    "mcast6.wild.test": ("AAAA", "ff02::1"),
}
UPSTREAM_CONF += "".join(f"address=/{n}/{a}\n" for n, (_t, a) in REBIND.items())

#: in no allowlist here: refused and logged, after every query asked before it
LOG_BARRIER = "log-barrier.test"

ALLOWLIST = """\
allowed.test          # exact: its subdomains must be refused
*.wild.test:443       # wildcard: subdomains yes, apex no
alias.test            # answered through a CNAME to a name we do not list
"""

# The daemon's hook in its own process (as the daemon runs it: nft/ipset writer, the
# allowlist's matcher, the screened networks); refused names go to a file, one a line.
HOOK = r"""
import asyncio, ipaddress, json, sys
from codetainer.network.allowlist import Allowlist, parse_text
from codetainer.network.dnsconfig import parse_upstreams
from codetainer.network.dnshook import DnsHook, IpsetWriter, NftSetWriter, SetRoutes
cfg = json.loads(sys.argv[1])
allow = Allowlist(tuple(parse_text(cfg["allowlist"], "domains.conf")))
refused = open(cfg["refused"], "a", buffering=1)
async def main():
    writer = NftSetWriter() if cfg["backend"] == "nftset" else IpsetWriter(timeout=cfg["timeout"])
    hook = DnsHook(cfg["listen"], parse_upstreams(cfg["upstreams"]), SetRoutes(cfg["sets"]),
                   writer, allowed=lambda n: allow.match(n) is not None, sock_uid=None,
                   on_refused=lambda name, client: refused.write(name + "\n"),
                   screened=[ipaddress.ip_network(n) for n in cfg["screened"]])
    await hook.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *cmd: str, input: str | None = None) -> str:
        res = subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            input=input,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, f"{cmd}: {res.stderr}"
        return res.stdout

    def spawn(self, *cmd: str, stderr: Path) -> subprocess.Popen[bytes]:
        with stderr.open("wb") as err:
            # ip netns exec execs the command: the pid is the server's own. Both streams
            # to the log: dnsmasq logs to stderr, CoreDNS to stdout.
            p = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        self.procs.append(p)
        return p

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread that has joined this namespace (sockets it makes
        live there); the calling thread stays where it is."""
        box: dict[str, object] = {}

        def target() -> None:
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=target)
        t.start()
        t.join(60)
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = f"ct-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Netns(name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        for p in ns.procs:
            if p.poll() is None:
                os.kill(p.pid, 15)
        for p in ns.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, 9)
                p.wait(5)
        subprocess.run(["ip", "netns", "del", name], check=True)


def ask(
    ns: Netns, name: str, rdtype: str = "A", server: str = "127.0.0.53", timeout: float = 2,
    port: int = 53,
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    return ns.call(lambda: dns.query.udp(q, server, timeout=timeout, port=port))


def addresses(msg: dns.message.Message, rdtype: str = "A") -> set[str]:
    want = dns.rdatatype.from_text(rdtype)
    return {rd.to_text() for rr in msg.answer if rr.rdtype == want for rd in rr}


def wait_answering(ns: Netns, server: str, proc: subprocess.Popen[bytes], log: Path,
                   port: int = 53) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server on {server}:{port} exited: {log.read_text()}"
        try:
            ask(ns, "probe.invalid", server=server, timeout=0.2, port=port)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
    raise AssertionError(f"the server on {server}:{port} never answered: {log.read_text()}")


def make_sets(ns: Netns, cfg: GeneratedConfig, backend: SetBackend = SetBackend.NFTSET) -> None:
    if backend is SetBackend.IPSET:
        for s in cfg.dynamic_sets:
            family = "inet" if s.family == 4 else "inet6"
            ns.run("ipset", "create", s.ipset, "hash:ip", "family", family,
                   "timeout", str(cfg.set_timeout))
        return
    rules = ["add table inet codetainer"]
    for s in cfg.dynamic_sets:
        kind = "ipv4_addr" if s.family == 4 else "ipv6_addr"
        rules.append(
            f"add set inet codetainer {s.name} "
            f"{{ type {kind}; flags timeout; timeout {cfg.set_timeout}s; }}"
        )
    ns.run("nft", "-f", "-", input="\n".join(rules) + "\n")


def members(ns: Netns, s: DynamicSet, backend: SetBackend = SetBackend.NFTSET) -> set[str]:
    """The addresses in a dynamic set, read from the kernel (``nft -j`` / ``ipset save``)."""
    if backend is SetBackend.IPSET:
        out = ns.run("ipset", "save", s.ipset)
        return {ln.split()[2] for ln in out.splitlines() if ln.startswith("add ")}
    data = json.loads(ns.run("nft", "-j", "list", "set", "inet", "codetainer", s.name))
    elems = next(o["set"] for o in data["nftables"] if "set" in o).get("elem", [])
    return {str(e["elem"]["val"] if isinstance(e, dict) else e) for e in elems}


@dataclass
class Server:
    """Our DNS server (and, for CoreDNS, the hook) as started by :func:`start_server`."""

    engine: Engine
    cfg: GeneratedConfig
    log: Path
    #: CoreDNS: the hook's refusals (its own, and internal answers), one name a line
    hook_refused: Path | None = None
    listen: str = "127.0.0.53"

    def refused(self, ns: Netns) -> set[str]:
        """Names refused so far, from the server's log through the daemon's parser (and,
        for CoreDNS, the hook's own refusals, which the daemon records directly).

        dnsmasq writes its log asynchronously (log-async): a refused name asked last is
        waited for, and once it is logged every earlier query is too."""
        ask(ns, LOG_BARRIER, server=self.listen)
        deadline = time.monotonic() + 10
        while LOG_BARRIER not in (names := self._refused_now()):
            assert time.monotonic() < deadline, f"{LOG_BARRIER} never logged as refused"
            time.sleep(0.02)
        return names

    def _refused_now(self) -> set[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        if self.engine is Engine.DNSMASQ:
            return {r.name for ln in lines if (r := parse_dnsmasq_log_line(ln))}
        names = {r.name for ln in lines if (r := parse_coredns_log_line(ln))}
        assert self.hook_refused is not None
        return names | set(self.hook_refused.read_text().split())


def start_server(
    ns: Netns,
    tmp: Path,
    listen: str,
    ipv6: bool,
    engine: Engine,
    *,
    allowlist: str = ALLOWLIST,
    backend: SetBackend = SetBackend.NFTSET,
    edit: Callable[[str], str] = lambda text: text,
) -> Server:
    """The kernel sets, then our server on ``listen``:53 from the generated config; for
    CoreDNS the hook first, on 127.0.0.1:(5300 + last octet of ``listen``)."""
    allow = Allowlist(tuple(parse_text(allowlist, "domains.conf")))
    hook = f"127.0.0.1:{5300 + int(listen.rsplit('.', 1)[1])}"
    options = DnsOptions(
        listen=listen,
        upstreams=parse_upstreams("127.0.0.2"),
        ipv6=ipv6,
        max_ttl=MAX_TTL,
        user="nobody",  # dnsmasq drops root and must still fill the sets
        group="nogroup",
        hook=hook if engine is Engine.COREDNS else None,
    )
    plan = DnsPlan.build(allow, ipv6=options.ipv6)  # as compose.make_plan
    cfg = (render_corefile(plan, options) if engine is Engine.COREDNS
           else render_dnsmasq(plan, options, backend))
    make_sets(ns, cfg, backend)
    hook_refused = None
    if engine is Engine.COREDNS:
        hook_refused = tmp / f"hook-{listen}.refused"
        hook_refused.write_text("")
        spec = {"listen": hook, "upstreams": "127.0.0.2", "allowlist": allowlist,
                "sets": plan.domain_sets, "backend": backend.value,
                "timeout": cfg.set_timeout, "refused": str(hook_refused),
                "screened": [str(n) for n in cfg.screened]}
        hook_log = tmp / f"hook-{listen}.log"
        proc = ns.spawn(sys.executable, "-c", HOOK, json.dumps(spec), stderr=hook_log)
        host, port = hook.split(":")
        wait_answering(ns, host, proc, hook_log, port=int(port))
    name = "Corefile" if engine is Engine.COREDNS else "dnsmasq.conf"
    conf = tmp / f"{name}-{listen}"
    conf.write_text(edit(cfg.text))
    script = tmp / f"run-{listen}.sh"
    script.write_text(exec_script(cfg.engine, str(conf)))
    script.chmod(0o755)
    log = tmp / f"{engine.value}-{listen}.log"
    proc = ns.spawn(str(script), stderr=log)
    wait_answering(ns, listen, proc, log)
    return Server(engine, cfg, log, hook_refused, listen)


@pytest.fixture
def world(netns: Netns, tmp_path: Path) -> tuple[Netns, Path]:
    up_conf = tmp_path / "upstream.conf"
    up_conf.write_text(UPSTREAM_CONF)
    up_log = tmp_path / "upstream.log"
    up = netns.spawn("dnsmasq", "--keep-in-foreground", f"--conf-file={up_conf}", stderr=up_log)
    wait_answering(netns, "127.0.0.2", up, up_log)
    # the upstream really answers everything we later expect to be refused
    for name in ("denied.test", "sub.allowed.test", "wild.test"):
        assert addresses(ask(netns, name, server="127.0.0.2")), name
    return netns, tmp_path


@pytest.mark.parametrize("engine", ENGINES)
def test_filters_and_fills_the_sets_before_answering(
    world: tuple[Netns, Path], engine: Engine
) -> None:
    ns, tmp = world
    srv = start_server(ns, tmp, "127.0.0.53", ipv6=False, engine=engine)
    assert {s.name for s in srv.cfg.dynamic_sets} == {"d4_80_443", "d4_443"}
    d80_443, d443 = DynamicSet(4, (80, 443)), DynamicSet(4, (443,))

    # allowed name resolves, and its address is in the set when the answer arrives
    r = ask(ns, "allowed.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"203.0.113.10"}
    assert "203.0.113.10" in members(ns, d80_443)

    # not allowlisted: NXDOMAIN, and no address reached any set
    r = ask(ns, "denied.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer

    # subdomain of an exact entry: refused (any letter case)
    for name in ("sub.allowed.test", "SUB.Allowed.TEST"):
        r = ask(ns, name)
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, name

    # wildcard: subdomains (any depth) allowed into the wildcard's port set; apex refused
    r = ask(ns, "a.wild.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"203.0.113.20"}
    assert addresses(ask(ns, "b.c.wild.test")) == {"203.0.113.20"}
    assert ask(ns, "wild.test").rcode() == dns.rcode.NXDOMAIN
    assert ask(ns, "WILD.test").rcode() == dns.rcode.NXDOMAIN
    assert "203.0.113.20" in members(ns, d443)
    assert "203.0.113.20" not in members(ns, d80_443)

    # a CNAME to an unlisted name: the final address is added too
    r = ask(ns, "alias.test")
    assert addresses(r) == {"203.0.113.40"}
    assert "203.0.113.40" in members(ns, d80_443)

    # AAAA answered empty (NOERROR, no records) while IPv6 is off, upstream has one
    assert addresses(ask(ns, "allowed.test", "AAAA", server="127.0.0.2"), "AAAA")
    r = ask(ns, "allowed.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not addresses(r, "AAAA")

    # TCP queries are filtered the same way
    for name, rcode in (("denied.test", dns.rcode.NXDOMAIN), ("sub.allowed.test", dns.rcode.NXDOMAIN),
                        ("allowed.test", dns.rcode.NOERROR)):
        q = dns.message.make_query(name, "A")
        assert ns.call(lambda q=q: dns.query.tcp(q, "127.0.0.53", timeout=2)).rcode() == rcode, name

    # the TTL told to clients is capped (the upstream says 60), the first answer and the
    # cached ones alike; the dynamic sets outlive what any client was told
    assert {rr.ttl for rr in ask(ns, "allowed.test", server="127.0.0.2").answer} == {60}
    r = ask(ns, "b.wild.test")  # not asked before: the answer straight from upstream
    assert r.answer and all(0 < rr.ttl <= MAX_TTL for rr in r.answer), r.to_text()
    assert all(0 < rr.ttl <= MAX_TTL for rr in ask(ns, "allowed.test").answer)
    assert srv.cfg.set_timeout >= 2 * MAX_TTL

    # denied addresses never entered a set
    for s in (d80_443, d443):
        assert "203.0.113.30" not in members(ns, s)

    # refused names are visible in the server's log, through the daemon's parser
    refused = srv.refused(ns)
    assert {"denied.test", "sub.allowed.test", "wild.test"} <= refused
    assert not refused & {"allowed.test", "a.wild.test", "alias.test", "b.c.wild.test"}


@pytest.mark.parametrize("engine", ENGINES)
def test_ipv6_on_answers_aaaa_and_fills_the_v6_set(world: tuple[Netns, Path], engine: Engine) -> None:
    ns, tmp = world
    start_server(ns, tmp, "127.0.0.54", ipv6=True, engine=engine)
    r = ask(ns, "allowed.test", "AAAA", server="127.0.0.54")
    assert addresses(r, "AAAA") == {"2001:db8::10"}
    assert "2001:db8::10" in members(ns, DynamicSet(6, (80, 443)))
    assert "2001:db8::10" not in members(ns, DynamicSet(4, (80, 443)))
    assert ask(ns, "sub.allowed.test", "AAAA", server="127.0.0.54").rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("engine", ENGINES)
def test_dnscheck_against_the_real_server(world: tuple[Netns, Path], engine: Engine) -> None:
    ns, tmp = world
    start_server(ns, tmp, "127.0.0.53", ipv6=False, engine=engine)

    health = ns.call(
        lambda: asyncio.run(dnscheck.check_dns("127.0.0.53", 53, "allowed.test", timeout=2))
    )
    assert health.ok, health.reason
    assert health.addresses == ("203.0.113.10",)

    bad = ns.call(
        lambda: asyncio.run(dnscheck.check_dns("127.0.0.53", 53, "denied.test", timeout=2))
    )
    assert not bad.ok and not bad.answered

    names = ["allowed.test", "a.wild.test", "alias.test", "denied.test", "sub.allowed.test"]
    res = ns.call(
        lambda: asyncio.run(dnscheck.resolve_all(names, "127.0.0.53", 53, timeout=2, ipv6=True))
    )
    assert res["allowed.test"].addresses == ("203.0.113.10",)  # AAAA filtered
    assert res["allowed.test"].error is None
    assert res["allowed.test"].ttl is not None and 0 < res["allowed.test"].ttl <= MAX_TTL
    assert res["alias.test"].addresses == ("203.0.113.40",)
    assert res["a.wild.test"].addresses == ("203.0.113.20",)
    assert res["denied.test"].error == "NXDOMAIN"
    assert res["sub.allowed.test"].error == "NXDOMAIN"

    # with the server (and its hook) gone, the health check says so quickly
    for p in ns.procs[1:]:
        os.kill(p.pid, 15)
        p.wait(5)
    down = ns.call(
        lambda: asyncio.run(dnscheck.check_dns("127.0.0.53", 53, "allowed.test", timeout=0.5))
    )
    assert not down.ok and down.latency < 3


# -- internal answers (DNS rebinding) ---------------------------------------------------


def rebind_world(
    world: tuple[Netns, Path],
    backend: SetBackend,
    engine: Engine,
    *,
    allowlist: str = ALLOWLIST,
    edit: Callable[[str], str] = lambda text: text,
) -> Server:
    """Our server with IPv6 on, so AAAA answers reach the v6 sets."""
    ns, tmp = world
    for name, (rdtype, addr) in REBIND.items():  # the upstream really answers them
        assert addresses(ask(ns, name, rdtype, server="127.0.0.2"), rdtype) == {addr}, name
    return start_server(ns, tmp, "127.0.0.53", ipv6=True, engine=engine, allowlist=allowlist,
                        backend=backend, edit=edit)


def wild_sets() -> tuple[DynamicSet, DynamicSet]:
    return DynamicSet(4, (443,)), DynamicSet(6, (443,))


@pytest.mark.parametrize("backend", list(SetBackend))
@pytest.mark.parametrize("engine", ENGINES)
def test_internal_answers_are_refused_and_never_reach_the_dynamic_sets(
    world: tuple[Netns, Path], engine: Engine, backend: SetBackend
) -> None:
    """``*.wild.test`` is allowlisted and its upstream answers with addresses inside
    (model.INTERNAL): dnsmasq (``bogus-nxdomain=``) and the CoreDNS engine's hook turn
    those answers into NXDOMAIN before any set is filled, so no internal address enters
    a set and the client gets none."""
    ns = world[0]
    srv = rebind_world(world, backend, engine)
    d4, d6 = wild_sets()

    for name, (rdtype, _addr) in REBIND.items():
        r = ask(ns, name, rdtype)
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, (name, r.to_text())
    # every A/AAAA of the answer counts: a public address beside an internal one, and an
    # internal address at the end of a CNAME chain, take the whole answer down
    for name in ("mixed.wild.test", "cn.wild.test"):
        r = ask(ns, name)
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, (name, r.to_text())
    q = dns.message.make_query("tcp.wild.test", "A")  # TCP goes through the same screen
    assert ns.call(lambda: dns.query.tcp(q, "127.0.0.53", timeout=2)).rcode() == dns.rcode.NXDOMAIN

    # positive control: public answers under the same wildcard are answered and inserted,
    # and fd00::/8 (not in model.INTERNAL: left to the allowlist) is too
    assert addresses(ask(ns, "a.wild.test")) == {"203.0.113.20"}
    assert addresses(ask(ns, "a.wild.test", "AAAA"), "AAAA") == {"2001:db8::20"}
    assert addresses(ask(ns, "fd.wild.test", "AAAA"), "AAAA") == {"fd00:ce:1::10"}
    assert members(ns, d4, backend) == {"203.0.113.20"}
    assert members(ns, d6, backend) == {"2001:db8::20", "fd00:ce:1::10"}
    assert not members(ns, DynamicSet(4, (80, 443)), backend)

    # the screened names show as refused names (dnsmasq logs them as config NXDOMAIN; the
    # hook reports them to the daemon)
    refused = srv.refused(ns)
    assert {"meta.wild.test", "ll6.wild.test", "mixed.wild.test"} <= refused
    assert "a.wild.test" not in refused


def test_without_the_screen_dnsmasq_inserts_internal_answers(world: tuple[Netns, Path]) -> None:
    """The finding, reproduced: the same config less its ``bogus-nxdomain=`` lines fills
    the set with whatever the upstream said (so the test above can tell)."""
    ns = world[0]

    def unscreened(text: str) -> str:
        return "".join(ln for ln in text.splitlines(keepends=True)
                       if not ln.startswith("bogus-nxdomain="))

    rebind_world(world, SetBackend.NFTSET, Engine.DNSMASQ, edit=unscreened)
    d4, d6 = wild_sets()
    assert addresses(ask(ns, "meta.wild.test")) == {"169.254.169.254"}
    assert addresses(ask(ns, "ll6.wild.test", "AAAA"), "AAAA") == {"fe80::1"}
    assert "169.254.169.254" in members(ns, d4)
    assert "fe80::1" in members(ns, d6)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_cidr_entry_keeps_its_internal_network_resolvable(
    world: tuple[Netns, Path], engine: Engine
) -> None:
    """An explicit ``10.1.0.0/16`` entry opens that network by address, so a name
    answered inside it is answered; the rest of model.INTERNAL stays screened."""
    ns = world[0]
    rebind_world(world, SetBackend.NFTSET, engine, allowlist=ALLOWLIST + "10.1.0.0/16:5432\n")
    assert addresses(ask(ns, "cidr.wild.test")) == {"10.1.2.3"}
    assert ask(ns, "meta.wild.test").rcode() == dns.rcode.NXDOMAIN
    assert ask(ns, "mixed.wild.test").rcode() == dns.rcode.NXDOMAIN  # 10.9.9.9: outside it


async def test_installed_dnsmasq_supports_what_we_generate() -> None:
    # filter-AAAA needs 2.90; local=/*.name/ and server=/*.name/ need 2.86;
    # bogus-nxdomain=NET/PREFIX, IPv6 included, is what 2.90 does (the tests above)
    assert await dnsmasq_version() >= (2, 90)


def test_installed_coredns_is_the_dockerfiles_pin() -> None:
    """The CoreDNS on PATH (``./dev setup``'s build) is the version the image ships."""
    pin = re.search(r"^ARG COREDNS_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert pin, "no COREDNS_VERSION in the Dockerfile"
    binary = shutil.which(COREDNS_BIN)
    assert binary, "no coredns on PATH: run ./dev setup"
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=10)
    assert out.stdout.splitlines()[0] == f"CoreDNS-{pin[1]}", out.stdout
