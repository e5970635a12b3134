"""End to end: the whole boot as PID 1 in a scratch root joined to the test world, the agent
session, and `codetainer attach` driven through a pseudo-terminal, as `fly ssh console` would."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from codetainer.control.client import DaemonUnreachable
from codetainer.sandbox.fullboot import FullBoot, default_names, publish_names
from codetainer.sandbox.world import World

from tests.integration.test_attach import PtyProc

pytestmark = pytest.mark.integration

PROMPT = "Refactor the parser; the secret word is PROMPT-7f3a"
GH_PAT = "ghp_E2EsecretValue0123456789"
OAUTH = "sk-ant-oat01-E2Eoauth98765"
SOCK = "/run/codetainer/tmux/agent.sock"
#: a finished boot step as `codetainer attach` prints it while the machine boots
PROGRESS = re.compile(r"\[( OK |FAIL|WARN|SKIP)\] [a-z-]+")

STAND_IN = """#!/bin/sh
# stand-in for the Claude Code CLI (not installed on these machines)
case "$1" in
  plugin) sleep 1.5; echo "plugin: $*"; exit 0 ;;
esac
printf '%s\\n' "$@" > /tmp/agent-args
echo "agent running"
exec sleep 100000
"""


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World(ttl=60) as w:
        publish_names(w, default_names())
        yield w


@pytest.fixture
def base(open_tmp: Path) -> Path:
    (open_tmp / "standin").mkdir()
    claude = open_tmp / "standin" / "claude"
    claude.write_text(STAND_IN)
    claude.chmod(0o755)
    return open_tmp


def attach(fb: FullBoot) -> PtyProc:
    return PtyProc(fb.nsenter_argv("codetainer", "attach", env={
        "TERM": "xterm-256color", "CODETAINER_SOCKET": "/scratch-out/control.sock",
        "SHELL": "/bin/sh", "PS1": "SHELL-PROMPT$ "}), env={"PATH": os.environ["PATH"]})


def tmux_clients(fb: FullBoot) -> list[str]:
    r = fb.inside("tmux", "-S", SOCK, "list-clients", "-F", "#{client_pid}")
    return r.stdout.split()


async def until(pred: object, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


async def test_full_boot_session_and_attach(world: World, base: Path) -> None:
    env = {"GH_PAT": GH_PAT, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH, "CLAUDE_PROMPT": PROMPT,
           "CODETAINER_PLUGINS": "example/marketplace,tool@example",
           "CODETAINER_AGENT_COMMAND": "claude --dangerously-skip-permissions",
           # the filesystem step links ~/.local/bin/claude to it, as to /usr/local/bin/claude
           "CODETAINER_BIN_DIR": "/opt/standin"}
    fb = FullBoot(world, base, env=env, binds=((str(base / "standin"), "/opt/standin", True),))
    try:
        # The operator connects while the machine boots (the plugins step takes 3 s):
        # progress first, then the session. Watch both: the first progress line on the
        # terminal, and the daemon's `session` op (checked after each look at the terminal).
        p = attach(fb)
        progress_at: float | None = None
        session_at: float | None = None
        absent_after_progress = False
        progress_text = ""
        deadline = time.monotonic() + 30
        while session_at is None and time.monotonic() < deadline:
            if progress_at is None and PROGRESS.search(p.text):
                progress_at = time.monotonic()
                progress_text = p.text
            with contextlib.suppress(DaemonUnreachable, OSError):
                if fb.session()["exists"]:
                    session_at = time.monotonic()
                elif progress_at is not None:
                    absent_after_progress = True
            await asyncio.sleep(0.01)
        assert session_at is not None, f"no session; terminal:\n{p.text}"
        assert progress_at is not None, f"no progress line; terminal:\n{p.text}"
        assert absent_after_progress and progress_at < session_at, (
            f"progress only once the session existed; terminal:\n{p.text}")
        # the boot replayed from its first step, and the slow step shown before the session
        first = PROGRESS.search(progress_text)
        assert first is not None and first.group(0) == "[ OK ] secrets", progress_text
        assert re.search(r"\[( OK |WARN)\] plugins", p.text), p.text
        try:
            await until(lambda: len(tmux_clients(fb)) == 1, what="attach client in tmux")
        except AssertionError:
            raise AssertionError(f"not attached; terminal:\n{p.text}\nlog:\n"
                                 f"{fb.log()[-3000:]}") from None
        st = fb.status()
        assert st["state"] == "READY", st["reasons"]
        session = st["session"]
        assert session["state"] == "RUNNING"
        assert [pn["role"] for pn in session["panes"]] == ["agent", "shell"]
        ready = [e for e in fb.events() if e.get("event") == "session_ready"]
        assert ready, "session_ready not logged"
        # the agent: uid 1000, its prompt delivered, the prompt file gone
        agent_pid = str(session["panes"][0]["pid"])
        assert fb.inside("stat", "-c", "%u", f"/proc/{agent_pid}").stdout.strip() == "1000"
        await until(lambda: PROMPT in fb.inside("cat", "/tmp/agent-args").stdout,
                    what="agent got its prompt")
        assert fb.inside("ls", "/run/codetainer/tmux").stdout.split() == ["agent.sock"]
        log = fb.log()
        assert PROMPT not in log
        assert hashlib.sha256(PROMPT.encode()).hexdigest() in log
        # no secret in a log line, the status reply, or any command line
        assert GH_PAT not in log and OAUTH not in log
        assert GH_PAT not in json.dumps(st) and OAUTH not in json.dumps(st)
        cmdlines = fb.inside("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        assert GH_PAT not in cmdlines and OAUTH not in cmdlines
        init_env = fb.inside("sh", "-c", "tr '\\0' '\\n' < /proc/1/environ").stdout
        assert GH_PAT not in init_env and OAUTH not in init_env
        # orderly shutdown: the session goes first, then the services
        assert fb.stop() == 0
        names = [e.get("event") for e in fb.events()]
        assert names.index("session_stopped") < names.index("shutdown_complete")
        # the whole log, now that the daemon has exited: still no secret, no prompt
        log = fb.log()
        assert GH_PAT not in log and OAUTH not in log and PROMPT not in log
    finally:
        fb.close()
        if "p" in locals():
            p.close()


async def test_failed_boot_explains_and_leaves_a_shell(world: World, base: Path) -> None:
    fb = FullBoot(world, base, env={"GH_PAT": "", "CLAUDE_CODE_OAUTH_TOKEN": ""})
    try:
        st = fb.wait_boot()
        assert st["state"] == "FAILED"
        p = attach(fb)
        await p.expect(r"GH_PAT is empty")
        await p.expect(r"fly secrets set GH_PAT=<value> -a sandbox")
        await p.expect(r"opening a shell")
        p.write(b"echo alive-$((6*7))\n")
        await p.expect(r"alive-42")
        assert fb.inside("ps", "-o", "pid=", "-u", "1000").stdout.split() == []
        fb.proc.signal(signal.SIGTERM)
        assert fb.proc.wait(30) == 0
    finally:
        fb.close()
        if "p" in locals():
            p.close()
