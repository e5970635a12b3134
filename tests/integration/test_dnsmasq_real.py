"""Real dnsmasq, run from our generated config, in a fresh network namespace.

A second dnsmasq on 127.0.0.2 in the same namespace is the "upstream": it answers for
every test name (including the subdomains and names we must refuse), so a refusal
can only come from our config. The nft table ``inet codetainer`` with the dynamic sets
lives in the namespace too; we check that answered addresses land in it (the zero-race
path: dnsmasq inserts before it replies).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import subprocess
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
    DnsOptions,
    GeneratedConfig,
    dnsmasq_version,
    exec_script,
    generate_dnsmasq,
    parse_dnsmasq_log_line,
    parse_upstreams,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

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
"""

ALLOWLIST = """\
allowed.test          # exact: its subdomains must be refused
*.wild.test:443       # wildcard: subdomains yes, apex no
alias.test            # answered through a CNAME to a name we do not list
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
            # ip netns exec execs the command: the pid is dnsmasq's own
            p = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
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
    ns: Netns, name: str, rdtype: str = "A", server: str = "127.0.0.53", timeout: float = 2
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    return ns.call(lambda: dns.query.udp(q, server, timeout=timeout))


def addresses(msg: dns.message.Message, rdtype: str = "A") -> set[str]:
    want = dns.rdatatype.from_text(rdtype)
    return {rd.to_text() for rr in msg.answer if rr.rdtype == want for rd in rr}


def wait_answering(ns: Netns, server: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dnsmasq on {server} exited: {log.read_text()}"
        try:
            ask(ns, "probe.invalid", server=server, timeout=0.2)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
    raise AssertionError(f"dnsmasq on {server} never answered: {log.read_text()}")


def make_sets(ns: Netns, cfg: GeneratedConfig) -> None:
    rules = ["add table inet codetainer"]
    for s in cfg.dynamic_sets:
        kind = "ipv4_addr" if s.family == 4 else "ipv6_addr"
        rules.append(
            f"add set inet codetainer {s.name} "
            f"{{ type {kind}; flags timeout; timeout {cfg.set_timeout}s; }}"
        )
    ns.run("nft", "-f", "-", input="\n".join(rules) + "\n")


def set_elements(ns: Netns, set_name: str) -> str:
    return ns.run("nft", "list", "set", "inet", "codetainer", set_name)


def start_pair(
    ns: Netns, tmp: Path, listen: str, ipv6: bool
) -> tuple[GeneratedConfig, Path]:
    allow = Allowlist(tuple(parse_text(ALLOWLIST, "domains.conf")))
    cfg = generate_dnsmasq(
        allow,
        DnsOptions(
            listen=listen,
            upstreams=parse_upstreams("127.0.0.2"),
            ipv6=ipv6,
            max_ttl=120,
            user="nobody",  # dnsmasq drops root and must still fill nft sets
            group="nogroup",
        ),
    )
    conf = tmp / f"dnsmasq-{listen}.conf"
    conf.write_text(cfg.text)
    script = tmp / f"run-{listen}.sh"
    script.write_text(exec_script(cfg.engine, str(conf)))
    script.chmod(0o755)
    log = tmp / f"dnsmasq-{listen}.log"
    proc = ns.spawn(str(script), stderr=log)
    wait_answering(ns, listen, proc, log)
    return cfg, log


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


def test_dnsmasq_filters_and_fills_nft_sets(world: tuple[Netns, Path]) -> None:
    ns, tmp = world
    # sets must exist before dnsmasq answers (created from the generator's list)
    allow = Allowlist(tuple(parse_text(ALLOWLIST, "domains.conf")))
    probe_cfg = generate_dnsmasq(allow, DnsOptions(upstreams=parse_upstreams("127.0.0.2")))
    make_sets(ns, probe_cfg)
    cfg, log = start_pair(ns, tmp, "127.0.0.53", ipv6=False)
    assert {s.name for s in cfg.dynamic_sets} == {"d4_80_443", "d4_443"}

    # allowed name resolves, and its address is in the set when the answer arrives
    r = ask(ns, "allowed.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"203.0.113.10"}
    assert "203.0.113.10" in set_elements(ns, "d4_80_443")

    # not allowlisted: NXDOMAIN, and no address reached any set
    r = ask(ns, "denied.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer

    # subdomain of an exact entry: refused
    r = ask(ns, "sub.allowed.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer

    # wildcard: subdomains (any depth) allowed into the wildcard's port set; apex refused
    r = ask(ns, "a.wild.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"203.0.113.20"}
    assert addresses(ask(ns, "b.c.wild.test")) == {"203.0.113.20"}
    assert ask(ns, "wild.test").rcode() == dns.rcode.NXDOMAIN
    assert "203.0.113.20" in set_elements(ns, "d4_443")
    assert "203.0.113.20" not in set_elements(ns, "d4_80_443")

    # a CNAME to an unlisted name: the final address is added too
    r = ask(ns, "alias.test")
    assert addresses(r) == {"203.0.113.40"}
    assert "203.0.113.40" in set_elements(ns, "d4_80_443")

    # AAAA answered empty (NOERROR, no records) while IPv6 is off, upstream has one
    assert addresses(ask(ns, "allowed.test", "AAAA", server="127.0.0.2"), "AAAA")
    r = ask(ns, "allowed.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not addresses(r, "AAAA")

    # TCP queries are filtered the same way
    q = dns.message.make_query("denied.test", "A")
    assert ns.call(lambda: dns.query.tcp(q, "127.0.0.53", timeout=2)).rcode() == dns.rcode.NXDOMAIN

    # TTL told to clients is capped
    assert all(rr.ttl <= 120 for rr in ask(ns, "allowed.test").answer)

    # denied addresses never entered a set
    for s in ("d4_80_443", "d4_443"):
        assert "203.0.113.30" not in set_elements(ns, s)
    # the set timeout covers the cache TTL
    assert cfg.set_timeout >= 2 * 120

    # refused names are visible in dnsmasq's log, through our parser
    time.sleep(0.3)  # log-async
    refused = {r.name for ln in log.read_text().splitlines() if (r := parse_dnsmasq_log_line(ln))}
    assert {"denied.test", "sub.allowed.test", "wild.test"} <= refused
    assert not refused & {"allowed.test", "a.wild.test", "alias.test"}


def test_dnsmasq_ipv6_on_answers_aaaa_and_fills_v6_set(world: tuple[Netns, Path]) -> None:
    ns, tmp = world
    allow = Allowlist(tuple(parse_text(ALLOWLIST, "domains.conf")))
    make_sets(
        ns, generate_dnsmasq(allow, DnsOptions(upstreams=parse_upstreams("127.0.0.2"), ipv6=True))
    )
    start_pair(ns, tmp, "127.0.0.54", ipv6=True)
    r = ask(ns, "allowed.test", "AAAA", server="127.0.0.54")
    assert addresses(r, "AAAA") == {"2001:db8::10"}
    assert "2001:db8::10" in set_elements(ns, "d6_80_443")
    assert "2001:db8::10" not in set_elements(ns, "d4_80_443")
    assert ask(ns, "sub.allowed.test", "AAAA", server="127.0.0.54").rcode() == dns.rcode.NXDOMAIN


def test_dnscheck_against_real_dnsmasq(world: tuple[Netns, Path]) -> None:
    ns, tmp = world
    allow = Allowlist(tuple(parse_text(ALLOWLIST, "domains.conf")))
    make_sets(ns, generate_dnsmasq(allow, DnsOptions(upstreams=parse_upstreams("127.0.0.2"))))
    start_pair(ns, tmp, "127.0.0.53", ipv6=False)

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
    assert res["allowed.test"].ttl is not None and 0 < res["allowed.test"].ttl <= 120
    assert res["alias.test"].addresses == ("203.0.113.40",)
    assert res["a.wild.test"].addresses == ("203.0.113.20",)
    assert res["denied.test"].error == "NXDOMAIN"
    assert res["sub.allowed.test"].error == "NXDOMAIN"

    # with the server gone, the health check says so quickly
    for p in ns.procs[1:]:
        os.kill(p.pid, 15)
        p.wait(5)
    down = ns.call(
        lambda: asyncio.run(dnscheck.check_dns("127.0.0.53", 53, "allowed.test", timeout=0.5))
    )
    assert not down.ok and down.latency < 3


def test_installed_dnsmasq_supports_what_we_generate() -> None:
    # filter-AAAA needs 2.90; local=/*.name/ and server=/*.name/ need 2.86
    assert dnsmasq_version() >= (2, 90)
