"""The network boot steps for real: codetainerd as PID 1 in the test world's inner netns.

The daemon runs its own DNS server (the supervised ``dns`` service, from the config it
generated), installs the nftables firewall, resolves the allowlist through its server
and proves it all from the agent's uid. Every test runs with both engines (``engine``):
CoreDNS forwarding the allowlisted zones to the daemon's hook, and dnsmasq filling the
sets itself. The world's dnsmasq (``UPSTREAM``) answers for every test name, including
the names we must refuse, so a refusal can only come from our server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.cli.render import render_network, render_why
from codetainer.sandbox.daemonproc import BIN, DaemonProc
from codetainer.sandbox.netdaemon import (
    AGENT,
    ALLOWED,
    ALLOWLIST,
    DENIED,
    ENGINES,
    EXTRA,
    RECORDS,
    SERVICES,
    SUB,
    WILD,
    start_daemon,
    wait_boot,
)
from codetainer.sandbox.world import NEVER_HOSTS, UDP_ECHO, UPSTREAM, V6_HOSTS, World

pytestmark = pytest.mark.integration

_UDP = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
try:
    s.sendto(b"hello", (sys.argv[1], int(sys.argv[2]))); s.recv(100); print("answered")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno or 0, "error"))
"""

def dig(world: World, name: str, server: str = "127.0.0.53", uid: int = AGENT,
        rtype: str = "A") -> tuple[str, list[str]]:
    out = world.run_in(world.inner, ["dig", "+time=1", "+tries=1", "+noall", "+comments",
                                     "+answer", f"@{server}", name, rtype], uid=uid)
    m = re.search(r"status: ([A-Z]+)", out.stdout)
    if not m:
        return "TIMEOUT", []
    addrs = [ln.split()[-1] for ln in out.stdout.splitlines()
             if ln and not ln.startswith(";") and ln.split()[3:4] == [rtype]]
    return m[1], sorted(addrs)


def nft_set(world: World, name: str) -> str:
    out = world.run_in(world.inner, ["nft", "-j", "list", "set", "inet", "codetainer", name])
    assert out.returncode == 0, out.stderr
    return str(json.dumps(json.loads(out.stdout)["nftables"][1]["set"].get("elem", [])))


def step(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in st["steps"] if s["name"] == name)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def world(engine: str) -> Iterator[World]:
    """A fresh world per engine: nothing one daemon did carries over to the other."""
    with World() as w:
        for name, addrs in RECORDS.items():
            w.set_records(name, addrs)
        yield w


@pytest.fixture(scope="module")
def daemon(world: World, engine: str) -> Iterator[DaemonProc]:
    tmp = Path(tempfile.mkdtemp(prefix="ct-netd-"))
    tmp.chmod(0o755)  # the agent's uid reaches the control socket too
    d = start_daemon(world, tmp, engine=engine)
    try:
        yield d
    finally:
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- boot ----------------------------------------------------------------------------------


def test_boot_is_ready_with_every_network_step_ok(daemon: DaemonProc, engine: str) -> None:
    st = wait_boot(daemon)
    assert st["state"] == "READY", (st["reasons"], daemon.log()[-4000:])
    for name in ("network-config", "dns", "firewall", "network-selftest"):
        assert step(st, name)["state"] == "OK", step(st, name)
    assert "refused" in step(st, "network-selftest")["reason"]
    net = st["network"]
    assert net["engine"] == engine and net["backend"] == "nftables" and net["ipv6"] == "deny"
    assert net["hook"] == ("127.0.0.1#5354" if engine == "coredns" else None)
    assert net["names"] == 1 and net["addresses"] == 1
    assert net["last_refresh"]["ok"] == 1 and net["last_refresh"]["failed"] == 0
    assert 0 <= net["next_refresh_in_s"] <= 5
    assert net["degraded"] is None and net["selftest_ok"] is True
    text = "\n".join(render_network(net))  # the CLI's rendering of the daemon's data
    assert f"DNS {engine} on 127.0.0.53" in text and "1 names, 1 addresses" in text
    resolv = Path(daemon.tmp, "resolv.conf").read_text()
    assert "nameserver 127.0.0.53" in resolv
    assert Path(daemon.tmp, "run", "dns", "exec").stat().st_mode & 0o111
    # The dns step goes on as soon as the server answers; supervisord's RUNNING follows
    # at startsecs (1 s here).
    assert daemon.service("dns")["state"] in {"STARTING", "RUNNING"}
    daemon.wait_until(lambda: daemon.service("dns")["state"] == "RUNNING", 3.0, "dns RUNNING")


def test_allowed_name_resolves_and_connects(daemon: DaemonProc, world: World) -> None:
    wait_boot(daemon)
    assert dig(world, "allowed.test") == ("NOERROR", [ALLOWED])
    assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "connected"
    assert world.connect(ALLOWED, 80, uid=AGENT)[0] == "connected"
    assert world.connect(ALLOWED, 8443, uid=AGENT)[0] == "ECONNREFUSED"  # not an allowed port


def test_not_allowlisted_and_exact_subdomain_refused_wildcard_allowed(
    daemon: DaemonProc, world: World
) -> None:
    wait_boot(daemon)
    assert world.query("denied.test") == [DENIED]  # the upstream does answer it
    assert dig(world, "denied.test") == ("NXDOMAIN", [])
    assert dig(world, "sub.allowed.test") == ("NXDOMAIN", [])
    assert dig(world, "wild.test") == ("NXDOMAIN", [])
    assert dig(world, "a.wild.test") == ("NOERROR", [WILD])
    assert world.connect(WILD, 443, uid=AGENT)[0] == "connected"  # filled before the answer
    assert world.connect(WILD, 80, uid=AGENT)[0] == "ECONNREFUSED"  # the wildcard says :443
    for addr in (DENIED, SUB):
        assert world.connect(addr, 443, uid=AGENT)[0] == "ECONNREFUSED"
    # The refusals reached status (the server's log, parsed).
    def refused() -> set[str]:
        return {r["name"] for r in daemon.status()["network"]["refused"]}
    daemon.wait_until(lambda: {"denied.test", "sub.allowed.test", "wild.test"} <= refused(),
                      10, "refused names in status")


def test_direct_connections_refused_fast_dns_and_udp_blocked(daemon: DaemonProc, world: World) -> None:
    wait_boot(daemon)
    result, ms = world.connect(NEVER_HOSTS[1], 443, uid=AGENT)
    assert result == "ECONNREFUSED" and ms < 100, (result, ms)
    assert dig(world, "allowed.test", server=UPSTREAM)[0] == "TIMEOUT"  # direct upstream DNS
    tcp53 = world.connect(UPSTREAM, 53, uid=AGENT)[0]
    assert tcp53 == "ECONNREFUSED"
    udp = world.python_in(world.inner, _UDP, *map(str, UDP_ECHO), uid=AGENT).stdout.strip()
    assert udp in {"EPERM", "timeout"}, udp
    assert world.connect(V6_HOSTS[0], 443, uid=AGENT)[0] == "ECONNREFUSED"  # IPv6 policy: deny
    assert world.connect("169.254.169.254", 80, uid=AGENT)[0] == "ECONNREFUSED"


def test_a_name_never_opens_an_internal_address(daemon: DaemonProc, world: World) -> None:
    """DNS rebinding: an allowlisted wildcard whose records point at the metadata address
    or a private network. dnsmasq (``bogus-nxdomain=``, from model.INTERNAL) and the
    CoreDNS engine's hook turn such answers into NXDOMAIN before any set is filled, so
    nothing inside reaches a set; the firewall still screens internal addresses before
    the dynamic sets, and the refresh never puts them in a static set."""
    wait_boot(daemon)
    assert world.query("meta.wild.test") == ["169.254.169.254"]  # the upstream does answer
    assert dig(world, "meta.wild.test") == ("NXDOMAIN", [])
    assert dig(world, "lan.wild.test") == ("NXDOMAIN", [])  # one internal address is enough
    elements = nft_set(world, "d4_443")
    assert "169.254.169.254" not in elements and "10.1.2.3" not in elements
    for addr in ("169.254.169.254", "10.1.2.3"):
        result, ms = world.connect(addr, 443, uid=AGENT)
        assert result == "ECONNREFUSED" and ms < 100, (addr, result, ms)  # our reject, at once
        why = daemon.call("why", target=addr)
        assert not why["addresses"][0]["allowed"], render_why(why)
        assert "internal address" in render_why(why)
    assert dig(world, "a.wild.test") == ("NOERROR", [WILD])
    assert world.connect(WILD, 443, uid=AGENT)[0] == "connected"  # the public one still works


def test_why_explains_allowed_and_denied(daemon: DaemonProc, world: World) -> None:
    wait_boot(daemon)
    world.connect(NEVER_HOSTS[2], 443, uid=AGENT)
    world.connect(NEVER_HOSTS[2], 443, uid=AGENT)
    why = daemon.call("why", target="allowed.test")
    assert why["allowlisted"] and why["where"].endswith("domains.conf:2")
    assert why["addresses"][0]["addr"] == ALLOWED and why["addresses"][0]["allowed"]
    assert any(s.startswith(("s4_80_443", "d4_80_443")) for s in why["addresses"][0]["sets"])
    assert "ALLOWED" in render_why(why) and "domains.conf:2" in render_why(why)
    why = daemon.call("why", target=NEVER_HOSTS[2])
    assert not why["allowlisted"] and not why["addresses"][0]["allowed"]
    assert why["addresses"][0]["denied"][0]["packets"] == 2
    assert "denied 2x tcp/443" in render_why(why)
    why = daemon.call("why", target="denied.test")
    assert not why["allowlisted"] and why["rcode"] == "NXDOMAIN" and why["refused"]["count"] >= 1
    # end to end through the CLI, as any user may
    cli = subprocess.run([str(BIN / "codetainer"), "--socket", daemon.socket, "why", "sub.allowed.test"],
                         capture_output=True, text=True, timeout=20)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("sub.allowed.test: NOT ALLOWED")
    # status lists the denied destination
    daemon.wait_until(lambda: any(d["addr"] == NEVER_HOSTS[2] for d in daemon.status()["network"]["denied"]),
                      15, "denied destination in status")


def test_allow_grants_temporarily_and_expires(daemon: DaemonProc, world: World) -> None:
    wait_boot(daemon)
    assert dig(world, "extra.test") == ("NXDOMAIN", [])
    assert world.connect(EXTRA, 443, uid=AGENT)[0] == "ECONNREFUSED"
    cli = subprocess.run([str(BIN / "codetainer"), "--socket", daemon.socket, "allow", "extra.test",
                          "--for", "4s"], capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr + daemon.log()[-3000:]
    assert "allowed extra.test for 4s" in cli.stdout
    assert dig(world, "extra.test") == ("NOERROR", [EXTRA])
    assert world.connect(EXTRA, 443, uid=AGENT)[0] == "connected"
    net = daemon.status()["network"]
    assert [g["target"] for g in net["grants"]] == ["extra.test"]
    assert "temporary grant" in daemon.call("why", target="extra.test")["where"]
    granted = [e for e in daemon.events() if e.get("event") == "network_allow_granted"]
    assert granted and granted[-1]["target"] == "extra.test" and granted[-1]["by_uid"] == 0
    # it expires on its own: DNS refuses it again and its address is out of every set
    daemon.wait_until(lambda: not daemon.status()["network"]["grants"], 15, "grant expiry")
    daemon.wait_until(lambda: dig(world, "extra.test")[0] == "NXDOMAIN", 10, "NXDOMAIN after expiry")
    assert world.connect(EXTRA, 443, uid=AGENT)[0] == "ECONNREFUSED"
    assert any(e.get("event") == "network_allow_expired" for e in daemon.events())
    assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "connected"


def test_allow_validates_and_is_root_only(daemon: DaemonProc, world: World) -> None:
    from codetainer.control.client import RequestFailed

    wait_boot(daemon)
    for target, duration in (("bad{name", "1h"), ("*", "1h"), ("ok.test", "forever"), ("0.0.0.0/0", "1h")):
        with pytest.raises(RequestFailed) as exc:
            daemon.call("allow", target=target, duration=duration)
        assert exc.value.code == "bad_request", exc.value.message
    # an unprivileged user may ask why, not allow
    code = (f"import sys; sys.path[:0] = {sys.path!r}\n"
            "from codetainer.control.client import Client, RequestFailed\n"
            f"c = Client({daemon.socket!r}, timeout=10)\n"
            "print(c.call('why', target='allowed.test')['allowlisted'])\n"
            "try:\n    c.call('allow', target='x.test')\nexcept RequestFailed as e:\n    print(e.code)\n")
    argv = ["setpriv", f"--reuid={AGENT}", f"--regid={AGENT}", "--clear-groups", sys.executable, "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert out.stdout.split() == ["True", "permission_denied"], out.stderr


def test_reload_keeps_an_established_connection(daemon: DaemonProc, world: World) -> None:
    wait_boot(daemon)
    echo = world.held_connection(ALLOWED, 443, uid=AGENT)

    allow_file = Path(daemon.tmp, "domains.conf")
    assert echo("one") == "one"
    try:
        # allowed.test leaves the allowlist: new connections to it are refused at once,
        # the established one lives on.
        allow_file.write_text("*.wild.test:443\n")
        result = daemon.call("reload")["network"]
        assert result["ok"] and result["removed"] == ["allowed.test"] and result["dns_restarted"], result
        assert echo("two") == "two"
        assert dig(world, "allowed.test") == ("NXDOMAIN", [])
        assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "ECONNREFUSED"
        # a hostile edit is refused as a whole, nothing changes
        allow_file.write_text("allowed.test\nevil.test}\n")
        bad = daemon.call("reload")["network"]
        assert not bad["ok"] and "domains.conf:2" in bad["error"]
        assert dig(world, "allowed.test") == ("NXDOMAIN", [])
    finally:
        allow_file.write_text(ALLOWLIST)
        restored = daemon.call("reload")["network"]
    assert restored["added"] == ["allowed.test"]
    assert echo("three") == "three"
    assert dig(world, "allowed.test") == ("NOERROR", [ALLOWED])
    assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "connected"


def test_total_upstream_failure_changes_nothing(daemon: DaemonProc, world: World) -> None:
    wait_boot(daemon)
    before = nft_set(world, "s4_80_443")
    assert ALLOWED in before
    assert world.dns is not None
    world.dns.terminate()
    world.dns.wait(5)
    try:
        st = daemon.wait_until(lambda: (n := daemon.status()["network"])["degraded"] and n, 20,
                               "DEGRADED after upstream failure")
        assert "lookups failed" in st["degraded"] and "firewall unchanged" in st["degraded"]
        assert "DEGRADED" in "\n".join(render_network(st))
        failing = {f["name"]: f for f in st["failing"]}
        assert ALLOWED in failing["allowed.test"]["kept"] and failing["allowed.test"]["failures"] >= 1
        assert "failing: allowed.test" in "\n".join(render_network(st))
        seen = failing["allowed.test"]["failures"]

        def failures() -> int:
            rows = daemon.status()["network"]["failing"]
            return next((f["failures"] for f in rows if f["name"] == "allowed.test"), 0)

        daemon.wait_until(lambda: failures() >= seen + 2, 20, "two more failing refreshes")
        assert nft_set(world, "s4_80_443") == before
        assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "connected"
    finally:
        world._start_dns()
    daemon.wait_until(lambda: daemon.status()["network"]["degraded"] is None, 20, "recovery")
    daemon.wait_until(lambda: daemon.status()["network"]["failing"] == [], 20, "no failing names")


def test_status_names_the_denied_destination_it_resolved(daemon: DaemonProc, world: World) -> None:
    """A denied connection to an address a name resolved to (here: the wildcard's port
    rule says 443 only) is listed with that name."""
    wait_boot(daemon)
    assert dig(world, "a.wild.test") == ("NOERROR", [WILD])
    for _ in range(30):  # enough packets to rank among the top ten of this module's denials
        assert world.connect(WILD, 8080, uid=AGENT)[0] == "ECONNREFUSED"

    def row() -> dict[str, Any] | None:
        # All 30: a read of the counters (every 10 s) may fall in the middle of the loop.
        return next((d for d in daemon.status()["network"]["denied"]
                     if d["addr"] == WILD and d["port"] == 8080 and d["packets"] >= 30), None)
    found = daemon.wait_until(row, 25, "the denied destination in status")  # polled every 10 s
    assert found["name"] == "a.wild.test" and found["proto"] == "tcp" and found["packets"] >= 30
    assert abs(found["last_seen"] - time.time()) < 30 and found["seen"] == "last"
    assert f"denied {WILD}:8080/tcp (a.wild.test)" in "\n".join(render_network(daemon.status()["network"]))


def test_iptables_backend_boots_and_filters(open_tmp: Path, engine: str) -> None:
    with World() as world:
        for name, addrs in RECORDS.items():
            world.set_records(name, addrs)
        d = start_daemon(world, open_tmp, env={"CODETAINER_FIREWALL": "iptables"}, engine=engine)
        try:
            st = wait_boot(d)
            assert st["state"] == "READY", (st["reasons"], d.log()[-3000:])
            assert st["network"]["backend"] == "iptables"
            if engine == "dnsmasq":
                conf = (open_tmp / "run/dns/dnsmasq.conf").read_text()
                assert "ipset=/allowed.test/ct-d4_80_443" in conf
            else:  # the hook fills the ipsets
                assert "forward . 127.0.0.1:5354" in (open_tmp / "run/dns/Corefile").read_text()
            assert dig(world, "a.wild.test") == ("NOERROR", [WILD])
            assert world.connect(WILD, 443, uid=AGENT)[0] == "connected"  # ipset filled first
            assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "connected"
            assert world.connect(DENIED, 443, uid=AGENT)[0] == "ECONNREFUSED"
            assert dig(world, "allowed.test", server=UPSTREAM)[0] == "TIMEOUT"
            why = d.call("why", target="allowed.test")["addresses"][0]
            assert why["allowed"] and "s4_80_443" in why["sets"], why
        finally:
            d.close()


# -- failing closed ------------------------------------------------------------------------

HOSTILE = "\n".join([
    "allowed.test",
    "evil.test}",  # brace injection into a Corefile block
    "server=/#/8.8.8.8",  # dnsmasq option injection
    "a" * 300 + ".test",  # 300-character label
    "ctl\x01.test",  # control byte
    "*",
    "0.0.0.0/0",
]) + "\n"


def test_hostile_allowlist_fails_boot_without_weakening_the_firewall(tmp_path: Path) -> None:
    with World() as world:
        _hostile(world, tmp_path)


def _hostile(world: World, tmp_path: Path) -> None:
    import asyncio

    from codetainer.network.firewall import FirewallPolicy, Runner, make_backend

    # A firewall from an earlier boot is in place: only 203.0.113.10 allowed.
    backend = make_backend("nftables", Runner(["ip", "netns", "exec", world.inner]))
    asyncio.run(backend.apply(FirewallPolicy.build({(443,): [ALLOWED]}, dns_uid=65534, upstreams=[UPSTREAM])))
    before = world.run_in(world.inner, ["nft", "list", "table", "inet", "codetainer"]).stdout
    d = start_daemon(world, tmp_path, HOSTILE)
    try:
        st = wait_boot(d)
        assert st["state"] == "FAILED"
        rec = step(st, "network-config")
        assert rec["state"] == "FAILED"
        path = str(tmp_path / "domains.conf")
        for line in (2, 3, 4, 5, 6, 7):
            assert f"{path}:{line}:" in rec["reason"], (line, rec["reason"])
        assert f"{path}:1:" not in rec["reason"]
        assert any(f"{path}:2:" in r for r in st["reasons"])
        assert all(step(st, n)["state"] == "SKIPPED" for n in ("dns", "firewall", "network-selftest"))
        assert d.service("dns")["state"] == "STOPPED"
        assert not (tmp_path / "run" / "dns").exists()  # nothing was generated
        assert st["network"]["active"] is False
        after = world.run_in(world.inner, ["nft", "list", "table", "inet", "codetainer"]).stdout
        assert after == before
        assert world.connect(NEVER_HOSTS[0], 443, uid=AGENT)[0] == "ECONNREFUSED"
    finally:
        d.close()
        asyncio.run(backend.teardown())


def test_failed_selftest_or_dns_start_fails_the_boot(open_tmp: Path, engine: str) -> None:
    """The fatal network steps after network-config: a self-test that does not come out
    right, and a DNS server that cannot start, each leave boot FAILED with the reason,
    the later steps skipped (no services, no agent), and the default-deny firewall up."""
    (open_tmp / "a").mkdir()
    (open_tmp / "b").mkdir()
    with World() as world:
        for name, addrs in RECORDS.items():
            world.set_records(name, addrs)
        # 1. The "denied" probe target is in fact allowed: the self-test must catch it.
        d = start_daemon(world, open_tmp / "a", env={"CODETAINER_PROBE_DENIED": f"{ALLOWED}:443"},
                         engine=engine)
        try:
            st = wait_boot(d)
            assert st["state"] == "FAILED", st["reasons"]
            rec = step(st, "network-selftest")
            assert rec["state"] == "FAILED" and f"{ALLOWED}:443" in rec["reason"], rec
            assert "agent stays stopped" in (rec["hint"] or "")
            assert step(st, "services")["state"] == "SKIPPED"
            assert any("network-selftest" in r for r in st["reasons"])
            assert world.connect(DENIED, 443, uid=AGENT)[0] == "ECONNREFUSED"  # still default deny
        finally:
            d.close()
        # 2. The DNS server cannot bind its address: BACKOFF, FATAL, boot FAILED.
        once = SERVICES.replace("startretries=5", "startretries=1")
        d = start_daemon(world, open_tmp / "b", env={"CODETAINER_DNS_LISTEN": NEVER_HOSTS[3]},
                         services=once, engine=engine)
        try:
            st = wait_boot(d)
            assert st["state"] == "FAILED", st["reasons"]
            rec = step(st, "dns")
            assert rec["state"] == "FAILED" and "the DNS server did not start: FATAL" in rec["reason"], rec
            later = ("firewall", "network-selftest", "services")
            assert all(step(st, n)["state"] == "SKIPPED" for n in later)
            assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "ECONNREFUSED"  # sets never filled
            assert world.connect(DENIED, 443, uid=AGENT)[0] == "ECONNREFUSED"
        finally:
            d.close()


def test_a_dns_server_that_stops_answering_is_restarted(open_tmp: Path, engine: str) -> None:
    """A hung server (SIGSTOP: alive to the supervisor, silent to clients) is caught by
    the real health queries and restarted through the supervisor; filtering resumes."""
    import os
    import signal as sig

    with World() as world:
        for name, addrs in RECORDS.items():
            world.set_records(name, addrs)
        d = start_daemon(world, open_tmp, env={"CODETAINER_DNS_HEALTH_INTERVAL": "0.3"},
                         engine=engine)
        try:
            assert wait_boot(d)["state"] == "READY"
            d.wait_until(lambda: d.service("dns")["state"] == "RUNNING", 5, "dns RUNNING")
            old = d.service("dns")["pid"]
            assert old and dig(world, "allowed.test") == ("NOERROR", [ALLOWED])
            host_pid = next(p.pid for p in d.descendants() if p.name() == engine)
            os.kill(host_pid, sig.SIGSTOP)
            assert dig(world, "allowed.test")[0] == "TIMEOUT"
            new = d.wait_until(lambda: (p := d.service("dns")["pid"]) not in (None, old) and p, 20,
                               "the dns service restarted with a new pid")
            assert new != old
            d.wait_until(lambda: dig(world, "allowed.test") == ("NOERROR", [ALLOWED]), 10, "answers again")
            assert dig(world, "denied.test") == ("NXDOMAIN", [])
            events = [e["event"] for e in d.events()]
            assert events.count("dns_health_failed") >= 3 and "dns_restart" in events
            health = d.wait_until(lambda: (h := d.status()["network"]["dns_health"])["ok"] and h,
                                  5, "health ok")
            assert "refused" in health["reason"], health
        finally:
            d.close()
