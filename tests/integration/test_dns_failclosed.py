"""CoreDNS going wrong at boot, for real: the boot fails closed, with a reason that names
the fix, and the firewall stays default-deny.

codetainerd boots as PID 1 in the test world's inner netns with the CoreDNS engine. The
faults: no ``coredns`` on PATH; a Corefile the real CoreDNS refuses (a ``template``
whose regex does not compile, as a generator bug would write it); a binary that crashes
as it starts; and a hook that never answers (CoreDNS forwards to a socket that never
replies). The faulty binaries are small wrappers put first on the daemon's PATH, which
the generated exec script runs as the DNS user; the Corefile ones run the real CoreDNS.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from codetainer.network.dnsconfig import COREDNS_BIN
from codetainer.sandbox.daemonproc import DaemonProc
from codetainer.sandbox.world import World

from tests.integration.test_network_daemon import (
    AGENT,
    ALLOWED,
    DENIED,
    RECORDS,
    SERVICES,
    start_daemon,
    step,
    wait_boot,
)

pytestmark = pytest.mark.integration

REAL = shutil.which(COREDNS_BIN)
LATER = ("firewall", "network-selftest", "services")
ONCE = "startretries=1"

# The wrapper edits the Corefile it is given the way ``edit`` says (a sed script), into a
# copy next to itself, and runs the real CoreDNS on that copy.
EDITING = """#!/bin/sh
sed {edit} "$2" > "{dir}/Corefile.edited"
exec {real} -conf "{dir}/Corefile.edited"
"""


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World() as w:
        for name, addrs in RECORDS.items():
            w.set_records(name, addrs)
        yield w


def wrapper(tmp: Path, text: str) -> dict[str, str]:
    """A ``coredns`` in its own directory, first on the daemon's PATH."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(mode=0o755)
    exe = bin_dir / "coredns"
    exe.write_text(text.format(dir=bin_dir, real=REAL))
    exe.chmod(0o755)
    bin_dir.chmod(0o777)  # the DNS user writes the edited copy there
    return {"PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def boot_fails(world: World, tmp: Path, env: dict[str, str], failed: str) -> dict[str, object]:
    """Boot with CoreDNS and ``env``; the step ``failed`` fails, the later ones are skipped
    (no agent), and nothing but the default-deny firewall is in place. Returns that step's
    record."""
    d: DaemonProc = start_daemon(world, tmp, env=env, engine="coredns",
                                 services=SERVICES.replace("startretries=5", ONCE))
    try:
        st = wait_boot(d, 60)
        assert st["state"] == "FAILED", (st["reasons"], d.log()[-3000:])
        rec = step(st, failed)
        assert rec["state"] == "FAILED", rec
        assert any(failed in r for r in st["reasons"])
        assert all(step(st, n)["state"] == "SKIPPED" for n in (*LATER, "dns") if n != failed)
        if failed == "network-config":  # before anything was generated or installed (as for
            # a bad allowlist: test_network_daemon's hostile test), and the agent never runs
            assert st["network"]["active"] is False and not (tmp / "run" / "dns").exists()
            return dict(rec)
        # fail closed: the default-deny firewall is in place, its sets empty
        assert st["network"]["active"] is True
        assert world.connect(ALLOWED, 443, uid=AGENT)[0] == "ECONNREFUSED"
        assert world.connect(DENIED, 443, uid=AGENT)[0] == "ECONNREFUSED"
        return dict(rec)
    finally:
        d.close()


def test_no_coredns_on_path_fails_network_config(world: World, open_tmp: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # the image has it in /usr/local/bin
    assert shutil.which(COREDNS_BIN, path=env["PATH"]) is None
    rec = boot_fails(world, open_tmp, env, "network-config")
    assert "no `coredns` is on PATH" in str(rec["reason"]), rec
    assert "CODETAINER_DNS_ENGINE=dnsmasq" in str(rec["reason"]), rec


def test_a_corefile_coredns_refuses_fails_the_dns_step(world: World, open_tmp: Path) -> None:
    """A template regex that does not compile: the real CoreDNS exits at start, naming it."""
    assert REAL, "no coredns on PATH: run ./dev setup"
    env = wrapper(open_tmp, EDITING.replace("{edit}", """'s/match "^/match "(^/'"""))
    rec = boot_fails(world, open_tmp, env, "dns")
    reason = str(rec["reason"])
    assert "the DNS server did not start: FATAL" in reason, rec
    assert "template" in reason and "missing closing )" in reason, rec  # CoreDNS's own words


def test_a_coredns_that_crashes_at_start_fails_the_dns_step(world: World, open_tmp: Path) -> None:
    env = wrapper(open_tmp, "#!/bin/sh\necho 'panic: boom' >&2\nkill -SEGV $$\n")
    rec = boot_fails(world, open_tmp, env, "dns")
    assert "the DNS server did not start: FATAL" in str(rec["reason"]), rec
    assert "panic: boom" in str(rec["reason"]), rec


@pytest.mark.timeout(180)
def test_a_hook_that_never_answers_fails_the_dns_step(world: World, open_tmp: Path) -> None:
    """CoreDNS forwards the allowlisted zones to a socket that never replies: the allowed
    name gets no answer, the boot stops at ``dns``, and the hint says where to look."""
    assert REAL, "no coredns on PATH: run ./dev setup"
    silent = world.spawn_in(world.inner, [
        "/usr/bin/python3", "-I", "-c",
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 5399))\n"
        "t = socket.socket(); t.bind(('127.0.0.1', 5399)); t.listen()\n"
        "print('ready', flush=True); time.sleep(600)\n"])
    assert silent.stdout is not None and silent.stdout.readline().strip() == "ready"
    env = wrapper(open_tmp, EDITING.replace("{edit}", "'s/127.0.0.1:5354/127.0.0.1:5399/'"))
    rec = boot_fails(world, open_tmp, env, "dns")
    assert "does not filter as it must: allowed.test" in str(rec["reason"]), rec
    assert "never reached the daemon's DNS hook on 127.0.0.1:5354" in str(rec["hint"]), rec
    silent.kill()
