#!/usr/bin/env python3
"""Attach latency when the session is up: start of ``codetainer attach`` -> tmux client attached.

Sets up what the daemon would: a tmux session run as uid 1000 through setpriv
(SessionManager) and a control socket answering ``session`` (the real ControlServer and
``SessionManager.session_handler``). Then, N times: start the attach command on a fresh
pseudo-terminal and time until tmux has taken over the terminal (it switches to the
alternate screen, ``ESC[?1049h``); each attach is confirmed with ``tmux list-clients``.

The reference is a bare ``tmux -S SOCK attach -t $0`` (the floor: what any attach costs);
the ratio shows what our client adds (target <= 3x). Run as root:

    /opt/ctvenv/bin/python bench/bench_attach.py [-n 20] [--cmd "codetainer attach"]

``bench/bench_fastpaths.py --baseline TREE`` runs this harness against another checkout
too, round by round beside this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from _common import pct
from codetainer.boot.privileges import AgentUser
from codetainer.control.server import ControlServer
from codetainer.events import EventBus
from codetainer.session.tmux import SessionManager

try:
    from codetainer.session import attachfile
except ImportError:  # a baseline tree from before the attach file
    attachfile = None  # type: ignore[assignment]
from codetainer.settings import Settings

ALT_SCREEN = b"\x1b[?1049h"
UID = 1000


def time_attach(argv: list[str], env: dict[str, str], sock: str, deadline_s: float = 10.0) -> float:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    tty = os.ttyname(slave)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    buf = b""
    elapsed = None
    try:
        while time.perf_counter() - t0 < deadline_s:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            buf += chunk
            if ALT_SCREEN in buf:
                elapsed = time.perf_counter() - t0
                break
        if elapsed is None:
            raise RuntimeError(f"no attach within {deadline_s}s; output: {buf[-400:]!r}")
        # As root, codetainer attach runs its client on a relay pty (attach.dropped_attach):
        # a client counts when it is this attach's own or descends from it.
        out = subprocess.run(["tmux", "-S", sock, "list-clients", "-F",
                              "#{client_tty} #{client_pid}"],
                             capture_output=True, text=True, timeout=5).stdout.split("\n")
        clients = [line.split() for line in out if line.strip()]
        if not any(t == tty or proc.pid in {a.pid for a in psutil.Process(int(pid)).parents()}
                   for t, pid in clients):
            raise RuntimeError(f"{tty} (pid {proc.pid}) not among tmux clients {clients}")
        return elapsed
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        os.close(master)


def serve_in_thread(server: ControlServer, sm: SessionManager) -> tuple[asyncio.AbstractEventLoop,
                                                                          threading.Thread]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def main() -> None:
        await sm.start()
        server.register("session", sm.session_handler)
        await server.start()
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    if not ready.wait(15):
        raise RuntimeError("session/control server did not come up")
    return loop, t


@dataclass(frozen=True)
class Session:
    """What :func:`session_up` gives: the scratch dir, the control socket answering
    ``session``, tmux's socket and the session's id (``$0`` until tmux says)."""

    base: Path
    ctl: str
    tmux_socket: str
    session_id: str

    def bare_argv(self) -> list[str]:
        """The reference: a bare ``tmux attach`` to the session."""
        return ["tmux", "-S", self.tmux_socket, "attach-session", "-t", self.session_id]


@contextlib.contextmanager
def session_up(prefix: str) -> Iterator[Session]:
    """What the daemon would have up: the agent's tmux session (SessionManager, run as
    uid 1000 through setpriv) and a control socket answering ``session`` (the real
    ControlServer), served from a thread; all stopped and the scratch dir removed after."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        ws = base / "ws"
        ws.mkdir()
        os.chown(ws, UID, UID)
        ctl = str(base / "control.sock")
        settings = Settings(tmux_socket=str(base / "tmux" / "agent.sock"),
                            agent_command="exec sleep 3600", workspace=str(ws), home=str(ws))
        # the attach file, as the daemon keeps it (a tree from before it has none)
        keeps = {"attach_file": attachfile.path_for(ctl)} if attachfile else {}
        sm = SessionManager(settings, EventBus(), {}, AgentUser("claude", UID, UID, str(ws)),
                            **keeps)
        server = ControlServer(ctl)
        loop, thread = serve_in_thread(server, sm)
        try:
            yield Session(base, ctl, settings.tmux_socket, sm.session_id or "$0")
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
            asyncio.run_coroutine_threadsafe(sm.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def report(name: str, samples: list[float]) -> float:
    ms = sorted(s * 1000 for s in samples)
    med = statistics.median(ms)
    p90 = pct(ms, 90)
    print(f"{name:<32} median {med:7.1f} ms   min {ms[0]:7.1f}   p90 {p90:7.1f}   "
          f"max {ms[-1]:7.1f}   (n={len(ms)})")
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--cmd", default="",
                    help="attach command (default: codetainer attach from this venv if "
                    "installed, else python -m codetainer.cli.attach)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_attach: run as root (the session runs as uid 1000 via setpriv)")
        return 2
    with session_up("ct-bench-attach-") as s:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color",
               "HOME": str(s.base), "LANG": "C.UTF-8"}
        if args.cmd:
            ours = [*shlex.split(args.cmd), "--socket", s.ctl]
        else:
            venv_cli = Path(sys.executable).with_name("codetainer")
            ours = ([str(venv_cli), "--socket", s.ctl, "attach"] if venv_cli.exists()
                    else [sys.executable, "-m", "codetainer.cli.attach", "--socket", s.ctl])
        bare = s.bare_argv()
        time_attach(ours, env, s.tmux_socket)  # warm the page cache
        ours_s = [time_attach(ours, env, s.tmux_socket) for _ in range(args.n)]
        bare_s = [time_attach(bare, env, s.tmux_socket) for _ in range(args.n)]
        print(f"attach latency, session up ({' '.join(ours[:3])} ...):")
        m_ours = report("codetainer attach", ours_s)
        m_bare = report("bare tmux attach (floor)", bare_s)
        ok = m_ours <= 3 * m_bare
        print(f"overhead over bare tmux: {m_ours - m_bare:+.1f} ms "
              f"(ratio {m_ours / m_bare:.2f}x); target <= 3x bare (issue 10): "
              f"{'PASS' if ok else 'FAIL'} (side by side with a baseline: "
              "bench/bench_fastpaths.py)")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
