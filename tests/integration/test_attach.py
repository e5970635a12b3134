"""``codetainer attach`` driven through a pseudo-terminal against a stub control server.

The control server is the real :class:`ControlServer` with stub ``wait``/``status``
handlers and the real ``SessionManager.session_handler``; tmux is real and runs as uid
1000 through setpriv (no host user is created).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from codetainer.boot.privileges import AgentUser
from codetainer.control.server import ControlServer, Request, Send
from codetainer.events import EventBus
from codetainer.session.tmux import SessionManager
from codetainer.settings import Settings

pytestmark = pytest.mark.integration

UID = 1000
ATTACH = [sys.executable, "-m", "codetainer.cli.attach"]


class PtyProc:
    """A process on the slave side of a new pty, with it as controlling terminal."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 40, cols: int = 120):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.tty = os.ttyname(slave)
        # setsid -c: new session with the pty as controlling terminal, so Ctrl-C works.
        self.proc = subprocess.Popen(["setsid", "-c", *argv], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.started = time.monotonic()
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self._buf += chunk

    @property
    def text(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.text}")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)
        os.close(self.master)


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.ctl = str(base / "control.sock")
        ws, home = base / "ws", base / "home"
        (ws / "repo").mkdir(parents=True)
        home.mkdir()
        for p in (ws, ws / "repo", home):
            os.chown(p, UID, UID)
        self.socket = str(base / "run" / "tmux" / "agent.sock")
        self.settings = Settings(tmux_socket=self.socket, agent_command="exec sleep 1000",
                                 workspace=str(ws), home=str(home))
        self.bus = EventBus()
        self.sm = SessionManager(self.settings, self.bus, {},
                                 AgentUser("claude", UID, UID, str(home)), poll_interval=0.1)
        self.server = ControlServer(self.ctl)
        self.server.register("session", self.sm.session_handler)
        self.procs: list[PtyProc] = []
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color",
                    "HOME": str(base), "SHELL": "/bin/sh", "LANG": "C.UTF-8", "PS1": "$ "}

    def attach(self, *extra: str, term: str | None = None) -> PtyProc:
        env = dict(self.env)
        if term:
            env["TERM"] = term
        p = PtyProc([*ATTACH, "--socket", self.ctl, *extra], env)
        self.procs.append(p)
        return p

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True,
                              text=True, timeout=10)

    def clients(self) -> list[str]:
        """The operator ttys attached: each client's own tty is a relay pty (see
        ``attach.dropped_attach``), so a client is named by the tty of the ``attach`` it
        runs under (the session leader of the operator's terminal)."""
        r = self.tmux("list-clients", "-F", "#{client_pid}\t#{client_uid}\t#{client_tty}")
        if r.returncode != 0:
            return []
        found = []
        for line in r.stdout.splitlines():
            pid, uid, tty = line.split("\t")
            assert int(uid) == UID, f"a tmux client runs as uid {uid}, not the agent's"
            assert tty not in {p.tty for p in self.procs}, "a client holds the operator's tty"
            found.append(self.operator_tty(int(pid)))
        return found

    def operator_tty(self, pid: int) -> str:
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.proc.pid in {a.pid for a in psutil.Process(pid).parents()}:
                    return p.tty
        return f"unrelated client {pid}"


@pytest.fixture
async def world() -> AsyncIterator[World]:
    if os.geteuid() != 0:
        pytest.fail("attach integration tests need root (setpriv to uid 1000)")
    for tool in ("tmux", "setpriv", "setsid"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} must be installed")
    base = Path(tempfile.mkdtemp(prefix="ct-attach-", dir="/tmp"))
    os.chmod(base, 0o755)
    w = World(base)
    try:
        yield w
    finally:
        for p in w.procs:
            p.close()
        await w.server.close()
        await w.sm.stop()
        w.tmux("kill-server")
        shutil.rmtree(base, ignore_errors=True)


async def until(pred: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def step(name: str, state: str, **kw: Any) -> dict[str, Any]:
    return {"event": "boot.step", "name": name, "state": state, **kw}


async def shell_works(p: PtyProc) -> None:
    p.write(b"echo ALIVE$((40+2))\n")
    await p.expect(r"ALIVE42", timeout=10)


async def test_session_up_attaches_at_once_even_renamed_and_twice(world: World) -> None:
    await world.server.start()
    await world.sm.start()
    sid = world.sm.session_id or ""
    assert world.tmux("rename-session", "-t", sid, "renamed-by-hook").returncode == 0
    # the operator had selected the shell pane: attach brings them to the agent
    assert world.tmux("select-pane", "-t", world.sm.shell_pane or "").returncode == 0
    first = world.attach()
    await until(lambda: first.tty in world.clients(), what="first client attached")
    second = world.attach()
    await until(lambda: second.tty in world.clients(), what="second client attached")
    assert sorted(world.clients()) == sorted([first.tty, second.tty])
    active = world.tmux("display-message", "-p", "-t", sid, "#{pane_id}").stdout.strip()
    assert active == world.sm.agent_pane
    status = await world.sm.session_handler(None)
    assert status["name"] == "renamed-by-hook"


#: What the agent asks an attached client to run (``detach-client -E``): who it runs as.
REPORT = ("{ id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status; "
          "readlink /proc/self/fd/0; } > %s 2>&1")


async def test_agent_cannot_run_a_command_in_an_operators_client(world: World) -> None:
    """The agent commands its own tmux server to make the operator's attached client run a
    command (``detach-client -E``): it runs as the agent, unprivileged, on the relay pty."""
    await world.server.start()
    await world.sm.start()
    p = world.attach()
    await until(lambda: p.tty in world.clients(), what="operator attached")
    out = world.base / "ws" / "detach-report"
    agent = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
             "--bounding-set=-all", "tmux", "-S", world.socket]
    r = subprocess.run([*agent, "detach-client", "-E", REPORT % out], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    await until(out.exists, what="the command the agent sent to the client")
    await until(lambda: "NoNewPrivs" in out.read_text(), what="its report")
    report = out.read_text().splitlines()
    assert report[0] == str(UID), report
    assert "CapEff:\t0000000000000000" in report, report
    assert "CapBnd:\t0000000000000000" in report, report
    assert "NoNewPrivs:\t1" in report, report
    assert report[-1] != p.tty, "the client held the operator's own terminal"
    assert os.stat(out).st_uid == UID


async def test_detach_returns_to_roots_shell(world: World) -> None:
    await world.server.start()
    await world.sm.start()
    p = world.attach()
    await until(lambda: p.tty in world.clients(), what="operator attached")
    p.write(b"\x02d")  # C-b d
    await p.expect(r"detached; `codetainer attach` goes back")
    await until(lambda: not world.clients(), what="the client gone")
    p.write(b"echo UID=$(id -u) NOATTACH=$CODETAINER_NO_ATTACH\n")
    await p.expect(r"UID=0 NOATTACH=1")


async def test_slow_boot_shows_progress_then_attaches(world: World) -> None:
    release = asyncio.Event()

    async def wait(req: Request, send: Send) -> dict[str, Any]:
        await send(step("network", "RUNNING"))
        await send(step("network", "OK", duration_s=0.42, reason="12 names allowed"))
        await send(step("clone", "RUNNING"))
        await release.wait()
        await send(step("clone", "OK", duration_s=2.5))
        await send({"event": "boot.state", "state": "READY"})
        info = await world.sm.start()
        await send({"event": "session.ready", **info})
        return {"state": "READY", "reasons": []}

    world.server.register_stream("wait", wait)
    await world.server.start()
    p = world.attach()
    await p.expect(r"boot progress")
    await p.expect(r"\[ OK \] network 0\.42s\s+12 names allowed")
    await p.expect(r"clone \d+\.\ds")  # the spinner runs on a capable terminal
    assert world.tmux("has-session").returncode != 0, "progress must come before the session"
    release.set()
    await until(lambda: p.tty in world.clients(), what="client attached after boot")


async def test_plain_progress_without_capable_terminal(world: World) -> None:
    release = asyncio.Event()

    async def wait(req: Request, send: Send) -> dict[str, Any]:
        await send(step("firewall", "RUNNING"))
        await release.wait()
        await send(step("firewall", "OK", duration_s=0.1))
        info = await world.sm.start()
        await send({"event": "session.ready", **info})
        return {"state": "READY", "reasons": []}

    world.server.register_stream("wait", wait)
    await world.server.start()
    p = world.attach(term="dumb")
    await p.expect(r"\[ \.\. \] firewall")
    release.set()
    await p.expect(r"\[ OK \] firewall 0\.10s")
    assert "\x1b[K" not in p.text, "no cursor tricks on a dumb terminal"
    # TERM=dumb: tmux itself may refuse such a terminal, so only progress is asserted here


async def test_session_after_boot_result_is_polled(world: World) -> None:
    async def wait(req: Request, send: Send) -> dict[str, Any]:
        await send(step("network", "OK", duration_s=0.1))
        asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(
            world.sm.start()))
        return {"state": "DEGRADED", "reasons": ["plugins: 1 of 1 plugin commands failed"]}

    world.server.register_stream("wait", wait)
    await world.server.start()
    p = world.attach()
    await p.expect(r"DEGRADED")
    await p.expect(r"plugins: 1 of 1")
    await until(lambda: p.tty in world.clients(), what="client attached after polling")


async def test_failed_boot_prints_reason_then_shell(world: World) -> None:
    async def wait(req: Request, send: Send) -> dict[str, Any]:
        await send(step("network", "RUNNING"))
        await send(step("network", "FAILED", duration_s=1.2,
                        reason="firewall self-test: 192.0.2.1:443 was reachable",
                        hint="check that the kernel has nf_tables"))
        await send(step("session", "SKIPPED", reason="skipped: an earlier fatal step failed"))
        return {"state": "FAILED", "reasons": [
            "network: firewall self-test: 192.0.2.1:443 was reachable "
            "(check that the kernel has nf_tables)"]}

    world.server.register_stream("wait", wait)
    await world.server.start()
    p = world.attach()
    await p.expect(r"\[FAIL\] network 1\.20s\s+firewall self-test")
    await p.expect(r"fix: check that the kernel has nf_tables")
    await p.expect(r"boot FAILED")
    await p.expect(r"opening a shell")
    await shell_works(p)
    assert world.clients() == []


async def test_session_start_failure_prints_reason_then_shell(world: World) -> None:
    async def wait(req: Request, send: Send) -> dict[str, Any]:
        await send({"event": "session.failed", "reason": "tmux new-session failed: boom",
                     "hint": "look at the logs"})
        await asyncio.sleep(3600)
        return {}

    world.server.register_stream("wait", wait)
    await world.server.start()
    p = world.attach()
    await p.expect(r"tmux new-session failed: boom \(fix: look at the logs\)")
    await shell_works(p)


async def test_ctrl_c_during_boot_drops_to_shell(world: World) -> None:
    async def wait(req: Request, send: Send) -> dict[str, Any]:
        await send(step("clone", "RUNNING"))
        await asyncio.sleep(3600)
        return {}

    world.server.register_stream("wait", wait)
    await world.server.start()
    p = world.attach()
    await p.expect(r"clone")
    p.write(b"\x03")
    await p.expect(r"interrupted")
    await shell_works(p)


async def test_daemon_unreachable_says_so_then_shell(world: World) -> None:
    world.env["CODETAINER_ATTACH_WAIT"] = "1"
    p = world.attach()  # the control server was never started
    await p.expect(r"waiting for codetainerd to start")
    await p.expect(r"cannot reach codetainerd at .*control\.sock")
    await shell_works(p)
    p.write(b"echo NO_ATTACH=$CODETAINER_NO_ATTACH\n")
    await p.expect(r"NO_ATTACH=1")


async def test_daemon_starting_late_is_waited_for(world: World) -> None:
    p = world.attach()
    await p.expect(r"waiting for codetainerd to start")
    await world.sm.start()
    await world.server.start()
    await until(lambda: world.clients(), what="tmux client attached")


async def test_no_tty_prints_status_and_fails_fast(world: World) -> None:
    async def status(req: Request) -> dict[str, Any]:
        return {"state": "BOOTING", "steps": [
            {"name": "network", "state": "OK", "duration_s": 0.3, "reason": ""},
            {"name": "clone", "state": "RUNNING", "duration_s": None, "reason": ""}],
            "session": await world.sm.session_handler(req)}

    world.server.register("status", status)
    await world.server.start()
    t0 = time.monotonic()
    r = await asyncio.to_thread(subprocess.run, [*ATTACH, "--socket", world.ctl],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=20, env=world.env)
    assert time.monotonic() - t0 < 10
    assert r.returncode == 2
    assert "not a terminal" in r.stdout and "boot: BOOTING" in r.stdout
    assert "[ OK ] network" in r.stdout and "session: not running" in r.stdout
    # unreachable without a terminal: its own exit code, no shell
    r = await asyncio.to_thread(subprocess.run, [*ATTACH, "--socket", world.ctl + ".nope"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=20, env=world.env)
    assert r.returncode == 69 and "cannot reach codetainerd" in r.stdout


