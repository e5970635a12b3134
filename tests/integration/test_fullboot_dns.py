"""The whole machine booted with each DNS engine: CoreDNS (the image's, and the default of
the full boot and the sandbox) and dnsmasq (``CODETAINER_DNS_ENGINE=dnsmasq``).

codetainerd is PID 1 in a scratch root joined to the test world (``codetainer/sandbox/fullboot.py``),
CoreDNS from ``/usr/local/bin/coredns`` as in the image. The agent (uid 1000) resolves
through the local server and connects; what the allowlist does not name is refused and
shows in status; the only DNS-shaped thing it may talk to is that server: not the
upstream, and not the daemon's hook, which CoreDNS forwards the allowlisted zones to and
which fills the firewall's sets (only the DNS user, uid 999 here, reaches it).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from codetainer.sandbox.fullboot import FullBoot, default_names, publish_names
from codetainer.sandbox.world import UPSTREAM, World

pytestmark = pytest.mark.integration

AGENT = ("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--")
DNS_USER = ("setpriv", "--reuid=999", "--regid=999", "--clear-groups", "--")
HOOK = ("127.0.0.1", "5354")
CONNECT = ("import socket, sys; socket.create_connection((sys.argv[1], 443), 3).close(); "
           "print('connected')")


@pytest.fixture(scope="module", params=["coredns", "dnsmasq"])
def machine(request: pytest.FixtureRequest) -> Iterator[tuple[FullBoot, str, dict[str, str]]]:
    engine = str(request.param)
    base = Path(tempfile.mkdtemp(prefix=f"ct-fbdns-{engine}-", dir="/tmp"))
    base.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        world = cleanup.enter_context(World(ttl=60))
        published = publish_names(world, default_names())
        fb = FullBoot(world, base, env={"CODETAINER_DNS_ENGINE": engine})
        try:
            st = fb.wait_boot(120)
            net = st["network"]
            assert net["engine"] == engine, net
            for name in ("network-config", "dns", "firewall", "network-selftest"):
                rec = next(s for s in st["steps"] if s["name"] == name)
                assert rec["state"] == "OK", (rec, fb.log()[-3000:])
            yield fb, engine, published
        finally:
            fb.close()


def dig(fb: FullBoot, user: tuple[str, ...], server: str, name: str, *opts: str) -> str:
    """``status TEXT ADDR...`` of one query from inside the machine, or ``no answer``."""
    out = fb.inside(*user, "dig", "+time=1", "+tries=1", "+noall", "+comments", "+answer",
                    f"@{server}", *opts, name, "A").stdout
    m = re.search(r"status: ([A-Z]+)", out)
    if not m:
        return "no answer"
    addrs = sorted(ln.split()[-1] for ln in out.splitlines() if ln and not ln.startswith(";"))
    return " ".join([m[1], *addrs])


def an_allowed_name(published: dict[str, str]) -> tuple[str, str]:
    name = next(n for n in sorted(published) if not n.startswith("www."))
    return name, published[name]


def test_the_engine_runs_as_the_dns_user(machine: tuple[FullBoot, str, dict[str, str]]) -> None:
    fb, engine, _ = machine
    ps = fb.inside("ps", "-o", "uid=,comm=", "-C", engine).stdout.split()
    assert ps == ["999", engine], ps  # codetainer-dns (dnsmasq drops root after binding)
    assert "nameserver 127.0.0.53" in fb.inside("cat", "/etc/resolv.conf").stdout
    if engine == "coredns":
        exe = fb.inside("readlink", "-f", "/usr/local/bin/coredns").stdout.strip()
        assert re.fullmatch(r"/opt/coredns-[0-9.]+/coredns", exe), exe  # ./dev setup's build
        assert fb.status()["network"]["hook"] == "127.0.0.1#5354"


def test_the_agent_resolves_and_connects_to_allowlisted_names_only(
    machine: tuple[FullBoot, str, dict[str, str]],
) -> None:
    fb, _engine, published = machine
    name, addr = an_allowed_name(published)
    hosts = fb.inside(*AGENT, "getent", "ahostsv4", name)  # the libc resolver, resolv.conf
    assert hosts.returncode == 0 and addr in hosts.stdout, hosts
    ok = fb.inside(*AGENT, "/usr/bin/python3", "-I", "-c", CONNECT, addr)
    assert ok.stdout.strip() == "connected", ok.stderr
    assert dig(fb, AGENT, "127.0.0.53", "not-allowlisted.example") == "NXDOMAIN"
    assert dig(fb, AGENT, "127.0.0.53", f"deeper.{name}") == "NXDOMAIN"  # exact entry

    def refused() -> set[str]:
        return {r["name"] for r in fb.status()["network"]["refused"]}

    from codetainer.sandbox.daemonproc import wait_for

    wait_for(lambda: {"not-allowlisted.example", f"deeper.{name}"} <= refused(), 10,
             "the refused names in status")


def test_the_agent_may_ask_the_local_server_and_nothing_else_dns_shaped(
    machine: tuple[FullBoot, str, dict[str, str]],
) -> None:
    fb, engine, published = machine
    name, addr = an_allowed_name(published)
    # positive control: the local server answers the agent
    assert dig(fb, AGENT, "127.0.0.53", name) == f"NOERROR {addr}"
    assert dig(fb, AGENT, "127.0.0.53", name, "+tcp") == f"NOERROR {addr}"
    # the upstream: not from the agent
    assert dig(fb, AGENT, UPSTREAM, name) == "no answer"
    # the hook: not from the agent (UDP nor TCP), not even for an allowlisted name
    for proto in ("+notcp", "+tcp"):
        assert dig(fb, AGENT, HOOK[0], name, "-p", HOOK[1], proto) == "no answer", proto
    if engine == "coredns":  # and the hook is there: the DNS user's queries get answers
        assert dig(fb, DNS_USER, HOOK[0], name, "-p", HOOK[1]) == f"NOERROR {addr}"
        denied = fb.inside("nft", "list", "set", "inet", "codetainer", "denied4").stdout
        assert "127.0.0.1 . udp . 5354" in denied and "127.0.0.1 . tcp . 5354" in denied, denied
