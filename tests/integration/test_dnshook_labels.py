"""The daemon's DNS hook, for real, asked names whose labels hold a dot.

codetainerd boots as PID 1 in the test world's inner netns with the CoreDNS engine
(forwarding ``*.wild.test`` to the hook on 127.0.0.1:5354). The questions go straight to
the hook from the DNS user (the only uid the firewall lets reach it), raw wire format
built with dnspython, as a CoreDNS that forwarded them would send them: the two-label
name ``[x.wild][test]`` must be refused and never forwarded; ``a.wild.test`` still
resolves (any letter case) and its address reaches the dynamic set first, written by the
one persistent set helper the daemon started (no ``nft`` process per answer). Any other uid,
the agent's and root's included, is rejected before it reaches the hook.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from codetainer.sandbox.daemonproc import DaemonProc
from codetainer.sandbox.world import ALLOWED_HOSTS, World

from tests.integration.test_network_daemon import nft_set, start_daemon, wait_boot

pytestmark = pytest.mark.integration

HOOK = "127.0.0.1:5354"
WILD = ALLOWED_HOSTS[1]
DNS_UID = 65534  # start_daemon's CODETAINER_DNS_USER=nobody

# Run in the inner netns (as the DNS user, like the DNS server that forwards to the hook):
# one question to the hook, the reply's rcode and A records as one line.
ASK = r"""
import sys
import dns.message, dns.name, dns.query, dns.rcode
labels = [bytes.fromhex(h) for h in sys.argv[1].split(",")] + [b""]
q = dns.message.make_query(dns.name.Name(labels), "A")
host, port = sys.argv[2].rsplit(":", 1)
send = dns.query.tcp if sys.argv[3] == "tcp" else dns.query.udp
r = send(q, host, port=int(port), timeout=2)
print(dns.rcode.to_text(r.rcode()), *sorted(rd.to_text() for rr in r.answer for rd in rr))
"""


@pytest.fixture(scope="module")
def hooked() -> Iterator[tuple[World, DaemonProc]]:
    tmp = Path(tempfile.mkdtemp(prefix="ct-hooklabels-"))
    tmp.chmod(0o755)  # CoreDNS runs as the DNS user and reads its Corefile under it
    try:
        with World() as world:
            world.set_records("allowed.test", [ALLOWED_HOSTS[0]])  # the self-test's probe
            world.set_records("a.wild.test", [WILD])
            d = start_daemon(world, tmp, "allowed.test\n*.wild.test:443\n",
                             env={"CODETAINER_DNS_HOOK": HOOK}, engine="coredns")
            try:
                st = wait_boot(d)
                assert st["state"] == "READY", (st["reasons"], d.log()[-3000:])
                assert st["network"]["hook"] == "127.0.0.1#5354"
                yield world, d
            finally:
                d.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ask_hook(world: World, *labels: bytes, proto: str = "udp", uid: int = DNS_UID) -> str:
    arg = ",".join(label.hex() for label in labels)
    out = world.run_in(world.inner, [sys.executable, "-c", ASK, arg, HOOK, proto], uid=uid)
    if out.returncode != 0:
        return out.stderr.strip().splitlines()[-1]
    return out.stdout.strip()


def counts(d: DaemonProc) -> dict[str, int]:
    return dict(d.status()["network"]["hook_counts"])


@pytest.mark.timeout(120)
def test_hook_refuses_a_label_holding_a_dot(hooked: tuple[World, DaemonProc]) -> None:
    world, d = hooked
    before = counts(d)
    for proto in ("udp", "tcp"):
        assert ask_hook(world, b"x.wild", b"test", proto=proto) == "NXDOMAIN"
        assert ask_hook(world, b"a", b"x.wild", b"test", proto=proto) == "NXDOMAIN"
        assert ask_hook(world, b"a\x00", b"wild", b"test", proto=proto) == "NXDOMAIN"
    # The world answers NXDOMAIN too, so the rcode alone proves nothing: "refused" counts
    # the hook's own refusals (never forwarded) and only these queries. ("answered" moves
    # on its own: the refresh task keeps asking allowed.test through the hook.)
    assert counts(d)["refused"] - before["refused"] == 6, (before, counts(d))


@pytest.mark.timeout(120)
def test_hook_still_forwards_real_subdomains_in_any_case(hooked: tuple[World, DaemonProc]) -> None:
    world, d = hooked
    before = counts(d)
    assert ask_hook(world, b"a", b"wild", b"test") == f"NOERROR {WILD}"
    assert ask_hook(world, b"A", b"WiLd", b"TEST", proto="tcp") == f"NOERROR {WILD}"
    assert ask_hook(world, b"wild", b"test") == "NXDOMAIN"  # the apex of a wildcard
    after = counts(d)
    assert after["answered"] - before["answered"] >= 2 and after["refused"] - before["refused"] == 1
    assert WILD in nft_set(world, "d4_443")
    # every answer so far went through one persistent set helper, none through a
    # one-shot `nft` (a helper that never started would show set_helper_lost)
    events = [e.get("event") for e in d.events()]
    assert events.count("set_helper_started") == 1 and "set_helper_lost" not in events, d.log()[-3000:]


@pytest.mark.timeout(120)
def test_only_the_dns_user_reaches_the_hook(hooked: tuple[World, DaemonProc]) -> None:
    """The firewall rejects any other uid's packets to the hook (TCP reset, ICMP for UDP):
    the agent cannot fill the dynamic sets by asking the hook for an allowlisted name."""
    world, _d = hooked
    for uid in (1000, 0):
        for proto in ("udp", "tcp"):
            got = ask_hook(world, b"a", b"wild", b"test", proto=proto, uid=uid)
            assert not got.startswith("NOERROR"), (uid, proto, got)
    # the kernel's record of denied destinations has the hook, for both protocols
    denied = world.run_in(world.inner, ["nft", "list", "set", "inet", "codetainer", "denied4"]).stdout
    assert "127.0.0.1 . udp . 5354" in denied and "127.0.0.1 . tcp . 5354" in denied, denied
    assert ask_hook(world, b"a", b"wild", b"test") == f"NOERROR {WILD}"  # the DNS user's do
