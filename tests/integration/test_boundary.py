"""The agent never reaches root: attacks run as uid 1000 inside one full boot.

Each test is what a prompt-injected agent would try against a real codetainerd (PID 1
in a scratch root joined to the test world), with the positive control beside it. The
audit these follow is ``docs/security.md``; the firewall's inbound half is also covered
backend by backend in ``test_inbound.py``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import FullBoot, machine_with_repo
from codetainer.sandbox.scratchroot import OUT
from codetainer.sandbox.world import INNER_V4, INNER_V6, PYTHON

from tests.integration.test_attach import REPORT, PtyProc

pytestmark = pytest.mark.integration

UID = 1000
SOCK = "/run/codetainer/tmux/agent.sock"
GH_PAT = "ghp_BOUNDARYsecret0123456789"
AS_AGENT = ("setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
            "--bounding-set=-all", "--")
CODETAINER = str(Path(sys.executable).parent / "codetainer")

#: A tmux "server" of the agent's own: whatever client connects is told, in tmux's own
#: protocol, to exec a program (MSG_SHELL, protocol version 8 of tmux 3.3).
FAKE_SERVER = r"""
import os, socket, struct, sys
path, program = sys.argv[1], sys.argv[2]
try:
    os.unlink(path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    data = program.encode() + b"\0"
    c.sendall(struct.pack("=IHHII", 209, 16 + len(data), 0, 8, os.getpid()) + data)
    c.settimeout(1)
    try:
        c.recv(65536)
    except OSError:
        pass
    c.close()
"""

#: What the attacker wants run by root: report who it is, then open the firewall.
EVIL = f"""#!/bin/sh
{{ id -u; grep -E '^(CapEff|NoNewPrivs):' /proc/self/status
   /usr/sbin/nft add table inet evil 2>&1; echo "nft=$?"; }} > {OUT}/evil-report.tmp 2>&1
mv {OUT}/evil-report.tmp {OUT}/evil-report
"""


@pytest.fixture(scope="module")
def machine() -> Iterator[FullBoot]:
    with machine_with_repo("ct-boundary-", GH_PAT) as (fb, _, _):
        yield fb


def as_agent(fb: FullBoot, *argv: str) -> subprocess.CompletedProcess[str]:
    return fb.inside(*AS_AGENT, *argv)


@contextlib.contextmanager
def agent_daemon(fb: FullBoot, *argv: str) -> Iterator[subprocess.Popen[str]]:
    """A long-running process of the agent's; started once it prints its first line."""
    with subprocess.Popen(fb.nsenter_argv(*AS_AGENT, *argv), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
            yield proc
        finally:
            proc.kill()


def tables(fb: FullBoot) -> list[str]:
    r = fb.inside("nft", "list", "tables")
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_a_fake_tmux_server_on_the_socket_gets_no_root_client(machine: FullBoot) -> None:
    """The agent swaps its tmux socket for a server of its own that tells every client to
    exec a program: the daemon's next tmux call runs it as the agent, with nothing."""
    fb = machine
    out = fb.root.out
    (out / "fake_tmux.py").write_text(FAKE_SERVER)
    (out / "evil.sh").write_text(EVIL)
    (out / "evil.sh").chmod(0o755)
    (out / "evil-report").unlink(missing_ok=True)
    assert as_agent(fb, "tmux", "-S", SOCK, "kill-server").returncode == 0
    try:
        with agent_daemon(fb, PYTHON, "-I", f"{OUT}/fake_tmux.py", SOCK, f"{OUT}/evil.sh"):
            report = wait_for(lambda: (out / "evil-report").exists() and
                              (out / "evil-report").read_text(), 30, "a daemon tmux call")
    finally:
        fb.inside("rm", "-f", SOCK)
    lines = report.splitlines()
    assert lines[0] == str(UID), report
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines, report
    assert "nft=0" not in report and "evil" not in tables(fb), report
    # the operator's side is unchanged: the daemon brings the agent's session back
    info = fb.wait_session(timeout=90)
    assert info["uid"] == UID


def test_detach_client_exec_in_an_operators_attach_runs_as_the_agent(
        machine: FullBoot) -> None:
    """While an operator is attached through ``codetainer attach`` (root), the agent
    issues ``detach-client -E``: the command runs in the client as the agent, on a relay
    pty, never in root's client or on root's terminal."""
    fb = machine
    fb.wait_session(timeout=90)
    report = fb.root.out / "detach-report"
    report.unlink(missing_ok=True)
    op = PtyProc(fb.nsenter_argv(CODETAINER, "--socket", f"{OUT}/control.sock", "attach",
                                 env={"TERM": "xterm-256color"}), env={})
    try:
        def attached() -> bool:
            r = fb.inside("tmux", "-S", SOCK, "list-clients", "-F", "#{client_uid}")
            return r.returncode == 0 and r.stdout.split() == [str(UID)]

        wait_for(attached, 30, "the operator's client, as the agent's uid",
                 context=lambda: op.text)
        cmd = (REPORT % f"{OUT}/detach-report"
               + f"; /usr/sbin/nft add table inet evil2 >> {OUT}/detach-report 2>&1")
        r = as_agent(fb, "tmux", "-S", SOCK, "detach-client", "-E", cmd)
        assert r.returncode == 0, r.stderr
        text = wait_for(lambda: report.exists() and "NoNewPrivs" in report.read_text()
                        and report.read_text(), 30, "the command's report")
    finally:
        op.close()
    lines = text.splitlines()
    assert lines[0] == str(UID), text
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines, text
    assert lines[4] != op.tty, "the client ran on the operator's own terminal"
    assert "evil2" not in tables(fb)


LISTEN = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
print("listening", flush=True)
s.settimeout(20)
while True:
    c, _ = s.accept()
    c.sendall(b"from-the-agent\n")
    c.close()
"""


@pytest.mark.parametrize("addr", [INNER_V4, INNER_V6])
def test_no_world_host_reaches_an_agent_listener(machine: FullBoot, addr: str) -> None:
    """The agent listens; a host of the world (a Docker neighbour, another Machine)
    connects: nothing gets through, while the agent's own outbound still works."""
    fb = machine
    port = "8081"
    with agent_daemon(fb, PYTHON, "-I", "-c", LISTEN, addr, port):
        code = ("import socket,sys\n"
                "try:\n"
                "    c=socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)\n"
                "    print('got', c.recv(100))\n"
                "except OSError as e: print('refused', type(e).__name__)\n")
        r = fb.world.python_in(fb.world.world, code, addr, port)
        assert r.stdout.startswith("refused"), r.stdout + r.stderr
        # control: from inside the container the listener answers (it really listens)
        local = fb.inside(PYTHON, "-I", "-c", code, addr, port)
        assert "from-the-agent" in local.stdout, local.stdout + local.stderr


HOOK = f"""#!/bin/sh
id -u > {OUT}/hook-ran
"""


def test_root_never_runs_git_in_the_agents_repository(machine: FullBoot) -> None:
    """The agent plants a hook and ``core.fsmonitor`` in the repository it owns. Nothing
    the daemon does afterwards runs git there, and root's git (an operator's ``git
    status``) refuses the repository as another user's (``safe.directory``)."""
    fb = machine
    (fb.root.out / "hook.sh").write_text(HOOK)
    (fb.root.out / "hook.sh").chmod(0o755)
    marker = fb.root.out / "hook-ran"
    marker.unlink(missing_ok=True)
    repo = "/workspace/repo"
    for hook in ("post-checkout", "pre-commit", "fsmonitor-watchman", "post-index-change"):
        r = as_agent(fb, "cp", f"{OUT}/hook.sh", f"{repo}/.git/hooks/{hook}")
        assert r.returncode == 0, r.stderr
    r = as_agent(fb, "git", "-C", repo, "config", "core.fsmonitor", f"{OUT}/hook.sh")
    assert r.returncode == 0, r.stderr
    # control: the agent's own git runs the hook (it is a real one)
    assert as_agent(fb, "git", "-C", repo, "status", "--short").returncode == 0
    wait_for(marker.exists, 10, "the agent's own git running its hook")
    assert marker.read_text().strip() == str(UID)
    marker.unlink()
    # every operation of the daemon, then root's git
    for op, args in (("status", {}), ("session", {}), ("why", {"target": "github.com"})):
        fb.call(op, **args)
    assert fb.inside(CODETAINER, "--socket", f"{OUT}/control.sock", "reload").returncode == 0
    root_git = fb.inside("git", "-C", repo, "status", "--short")
    assert root_git.returncode != 0 and "dubious ownership" in root_git.stderr, root_git
    assert not marker.exists(), f"a hook ran as uid {marker.read_text().strip()}"
