"""The agent session with real tmux, run as uid 1000 through setpriv.

No host user is created: ``AgentUser("claude", 1000, 1000, home)`` is built directly,
and every file the agent touches lives in a scratch directory under /tmp owned by 1000.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import structlog
from codetainer import runner
from codetainer.boot.engine import BootContext, BootEngine, Policy
from codetainer.boot.privileges import AgentUser
from codetainer.events import EventBus
from codetainer.session.plugins import plugins_step
from codetainer.session.prompt import digest
from codetainer.session.tmux import SessionError, SessionManager, SessionState
from codetainer.settings import Settings

pytestmark = pytest.mark.integration

UID = 1000
AGENT = """#!/bin/sh
# stand-in for claude: records who/where/what it was started with, then waits
p="${1-}"
printf '{"uid": %s, "cwd": "%s", "argc": %s, "sha": "%s"}\\n' "$(id -u)" "$(pwd)" "$#" \
  "$(printf %s "$p" | sha256sum | cut -d' ' -f1)" >> "$HOME/agent.log"
exec sleep 1000
"""


@dataclass
class Env:
    base: Path
    ws: Path
    home: Path
    socket: str
    user: AgentUser

    def settings(self, **kw: str) -> Settings:
        values = {"tmux_socket": self.socket, "agent_command": str(self.base / "agent.sh"),
                  "workspace": str(self.ws), "home": str(self.home)}
        values.update(kw)
        return Settings(**values)

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True,
                              text=True, timeout=10)

    def agent_log(self) -> list[dict[str, object]]:
        path = self.home / "agent.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def env() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("session integration tests need root (setpriv to uid 1000)")
    if shutil.which("tmux") is None or shutil.which("setpriv") is None:
        pytest.fail("tmux and setpriv must be installed")
    base = Path(tempfile.mkdtemp(prefix="ct-session-", dir="/tmp"))
    os.chmod(base, 0o755)
    ws, home = base / "ws", base / "home"
    (ws / "repo").mkdir(parents=True)
    home.mkdir()
    for p in (ws, ws / "repo", home):
        os.chown(p, UID, UID)
    (base / "agent.sh").write_text(AGENT)
    os.chmod(base / "agent.sh", 0o755)
    socket = str(base / "run" / "tmux" / "agent.sock")
    e = Env(base, ws, home, socket, AgentUser("claude", UID, UID, str(home)))
    yield e
    e.tmux("kill-server")
    shutil.rmtree(base, ignore_errors=True)


async def until(pred: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.05)


async def monitor_ticks(sm: SessionManager, n: int) -> None:
    """Wait until the monitor has taken ``n`` more snapshots of the session: what it would
    have done in that many ticks, it has done."""
    seen = [sm.snapshot]

    def counted() -> bool:
        if sm.snapshot is not seen[-1]:
            seen.append(sm.snapshot)
        return len(seen) > n

    await until(counted, what=f"{n} more monitor ticks")


def manager(env: Env, bus: EventBus, **kw: object) -> SessionManager:
    settings_kw = {k: str(v) for k, v in kw.items() if k in ("agent_command", "agent_restart")}
    rest = {k: v for k, v in kw.items() if k not in settings_kw}
    return SessionManager(env.settings(**settings_kw), bus, rest.pop("secrets", {}),  # type: ignore[arg-type]
                          env.user, poll_interval=0.1, backoff_base=0.1, **rest)  # type: ignore[arg-type]


async def test_session_layout_user_cwd_and_prompt(env: Env) -> None:
    bus = EventBus()
    prompt = "fix the flaky test in src/app.py\nsecond line with 'quotes' and $VARS"
    sm = manager(env, bus, secrets={"CLAUDE_PROMPT": prompt}, environ={})
    with structlog.testing.capture_logs() as logs:
        info = await sm.start()
        await until(lambda: env.agent_log(), what="agent start")
    try:
        assert info["exists"] and info["id"] == "$0"
        sessions = env.tmux("list-sessions", "-F", "#{session_id}").stdout.split()
        assert sessions == ["$0"]
        panes = env.tmux("list-panes", "-t", "$0", "-F",
                         "#{pane_index} #{pane_id} #{pane_active} #{pane_height} #{pane_pid} "
                         "#{pane_start_command}").stdout.splitlines()
        assert len(panes) == 2
        top, bottom = (line.split(" ", 5) for line in panes)
        assert top[1] == sm.agent_pane and top[2] == "1", "agent pane must be selected"
        assert int(top[3]) > 3 * int(bottom[3]), "agent pane is the top ~80%"
        assert psutil.Process(int(top[4])).uids().real == UID
        assert psutil.Process(int(bottom[4])).uids().real == UID
        assert prompt not in top[5] and "quotes" not in top[5]
        [run] = env.agent_log()
        assert run == {"uid": UID, "cwd": str(env.ws / "repo"), "argc": 1, "sha": digest(prompt)}
        assert not os.path.exists(sm.prompt_file), "prompt file must be removed once read"
        # the tmux server itself runs as the agent, stripped of privilege
        server = psutil.Process(sm.server_pid or 0)
        assert server.uids().real == UID
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status and "CapBnd:\t0000000000000000" in status
        logged = json.dumps(logs)
        assert prompt not in logged and "quotes" not in logged
        assert any(e.get("sha256") == digest(prompt) for e in logs)
        assert any(e["event"] == "session.ready" for e in bus.history)
        # the project's tmux.conf is in force
        assert env.tmux("show", "-gv", "status").stdout.strip() == "off"
        assert env.tmux("show", "-sv", "escape-time").stdout.strip() == "0"
        assert env.tmux("show", "-gv", "history-limit").stdout.strip() == "100000"
        st = sm.status()
        assert [p["role"] for p in st["panes"]] == ["agent", "shell"] or not st["panes"]
    finally:
        await sm.stop()
    assert env.tmux("list-sessions").returncode != 0, "stop() must kill the server"


async def test_cwd_is_workspace_without_repo(env: Env) -> None:
    shutil.rmtree(env.ws / "repo")
    sm = manager(env, EventBus())
    await sm.start()
    try:
        await until(lambda: env.agent_log(), what="agent start")
        assert env.agent_log()[0]["cwd"] == str(env.ws)
        assert env.agent_log()[0]["argc"] == 0
    finally:
        await sm.stop()


async def test_agent_killed_is_respawned_and_counted(env: Env) -> None:
    bus = EventBus()
    sm = manager(env, bus)
    await sm.start()
    mon = asyncio.create_task(sm.monitor())
    try:
        await until(lambda: sm.snapshot is not None, what="first poll")
        pid = next(p.pid for p in sm.snapshot.panes if p.role == "agent")  # type: ignore[union-attr]
        os.kill(pid or 0, signal.SIGKILL)
        await until(lambda: sm.restarts["agent"] == 1, what="respawn")
        await until(lambda: len(env.agent_log()) == 2, what="second agent run")
        names = [e["event"] for e in bus.history]
        assert "session.agent_exited" in names and "session.respawned" in names
        exited = next(e for e in bus.history if e["event"] == "session.agent_exited")
        assert exited["pane"] == sm.agent_pane
        await until(lambda: sm.status()["panes"] and not sm.status()["panes"][0]["dead"],
                    what="live pane in status")
        st = sm.status()
        assert st["restarts"] == {"agent": 1, "server": 0}
        assert st["agent"] is not None and st["agent"]["rss_bytes"] > 0
    finally:
        await sm.stop()
        await mon


async def test_leave_policy_keeps_the_dead_pane(env: Env) -> None:
    bus = EventBus()
    sm = manager(env, bus, agent_restart="leave")
    await sm.start()
    mon = asyncio.create_task(sm.monitor())
    try:
        await until(lambda: sm.snapshot is not None, what="first poll")
        pid = next(p.pid for p in sm.snapshot.panes if p.role == "agent")  # type: ignore[union-attr]
        os.kill(pid or 0, signal.SIGTERM)
        await until(lambda: any(e["event"] == "session.agent_exited" for e in bus.history))
        await monitor_ticks(sm, 5)  # a respawn (0.1 s backoff) would have come by now
        st = sm.status()
        agent = next(p for p in st["panes"] if p["role"] == "agent")
        assert agent["dead"] and agent["dead_signal"] in ("15", "SIGTERM", None)
        assert st["restarts"]["agent"] == 0 and len(env.agent_log()) == 1
    finally:
        await sm.stop()
        await mon


async def test_rapid_failures_give_up(env: Env) -> None:
    bus = EventBus()
    sm = manager(env, bus, agent_command="sh -c 'exit 3'", max_rapid_restarts=2, stable_after=30.0)
    await sm.start()
    mon = asyncio.create_task(sm.monitor())
    try:
        await until(lambda: any(e["event"] == "session.gave_up" for e in bus.history),
                    what="give up")
        assert sm.restarts["agent"] == 2
        exited = [e for e in bus.history if e["event"] == "session.agent_exited"]
        assert exited[0]["status"] == 3
        assert sm.status()["gave_up"] is True
        assert "not restarting" in sm.status()["reason"]
    finally:
        await sm.stop()
        await mon


async def test_server_killed_is_recreated_and_counted(env: Env) -> None:
    bus = EventBus()
    sm = manager(env, bus)
    await sm.start()
    mon = asyncio.create_task(sm.monitor())
    try:
        old_pid = sm.server_pid
        assert old_pid
        os.kill(old_pid, signal.SIGKILL)
        await until(lambda: sm.restarts["server"] == 1, what="recreate")
        assert sm.state is SessionState.RUNNING and sm.server_pid != old_pid
        names = [e["event"] for e in bus.history]
        assert names.index("session.lost") < names.index("session.recreated")
        info = await sm.session_handler(None)
        assert info["exists"] is True and info["id"] == sm.session_id
        assert env.tmux("has-session", "-t", sm.session_id or "").returncode == 0
        await until(lambda: len(env.agent_log()) == 2, what="agent in new session")
        assert sm.status()["restarts"] == {"agent": 0, "server": 1}
    finally:
        await sm.stop()
        await mon


async def test_renamed_session_is_still_found(env: Env) -> None:
    sm = manager(env, EventBus())
    await sm.start()
    mon = asyncio.create_task(sm.monitor())
    try:
        sid = sm.session_id or ""
        assert env.tmux("rename-session", "-t", sid, "fix-flaky-test ✓").returncode == 0
        info = await sm.session_handler(None)
        assert info["exists"] and info["id"] == sid and info["name"] == "fix-flaky-test ✓"
        user = sm.user
        assert user is not None
        assert sm.attach_target() == {"socket": env.socket, "id": sid,
                                      "agent_pane": sm.agent_pane, "user": user.name,
                                      "uid": user.uid, "gid": user.gid, "home": user.home,
                                      "limits": sm.limits().as_dict()}
        await monitor_ticks(sm, 3)  # the renamed session seen, and not taken for lost
        assert sm.restarts == {"agent": 0, "server": 0}, "a rename is not a loss"
        assert sm.status()["name"] == "fix-flaky-test ✓"
    finally:
        await sm.stop()
        await mon


async def test_restarted_daemon_adopts_running_session(env: Env) -> None:
    first = manager(env, EventBus())
    await first.start()
    second = manager(env, EventBus())
    try:
        info = await second.start()
        assert info["id"] == first.session_id and second.agent_pane == first.agent_pane
        assert len(env.agent_log()) <= 1
    finally:
        await second.stop()


async def test_start_fails_with_reason_when_cwd_missing(env: Env) -> None:
    bus = EventBus()
    sm = manager(env, bus, cwd=str(env.base / "nope"))
    with pytest.raises(Exception, match="does not exist"):
        await sm.start()
    assert sm.state is SessionState.FAILED
    info = await sm.session_handler(None)
    assert info["exists"] is False and "does not exist" in info["reason"]
    assert any(e["event"] == "session.failed" for e in bus.history)


CLAUDE = """#!/bin/sh
echo "$(id -u) $*" >> "$HOME/claude.log"
case "$*" in *broken*) echo "error: plugin broken@x not found in marketplace" >&2; exit 1;; esac
echo ok
"""


async def test_plugins_step_runs_as_agent_and_degrades_on_failure(env: Env) -> None:
    claude = env.base / "claude"
    claude.write_text(CLAUDE)
    os.chmod(claude, 0o755)
    settings = env.settings(plugins="anthropics/claude-code, commit-commands@cc ,broken@x")
    ctx = BootContext(settings, EventBus())
    step = plugins_step(env.user, claude=str(claude))
    assert step.name == "plugins" and step.policy is Policy.DEGRADED
    engine = BootEngine([step], ctx)
    state = await engine.run()
    assert state.value == "DEGRADED"
    lines = (env.home / "claude.log").read_text().splitlines()
    assert lines == [f"{UID} plugin marketplace add anthropics/claude-code",
                     f"{UID} plugin install commit-commands@cc",
                     f"{UID} plugin install broken@x"]
    rec = engine.records["plugins"]
    assert "1 of 3" in rec.reason and "not found in marketplace" in rec.reason


async def test_unreachable_socket_dir_is_a_clear_error(env: Env) -> None:
    locked = env.base / "locked"
    locked.mkdir(mode=0o700)
    os.chmod(locked, 0o700)
    settings = env.settings(tmux_socket=str(locked / "tmux" / "agent.sock"))
    sm = SessionManager(settings, EventBus(), {}, env.user)
    with pytest.raises(SessionError, match=r"cannot reach .*locked is mode 700") as exc:
        await sm.start()
    assert exc.value.hint == f"chmod o+x {locked}"


HANGING_CLAUDE = """#!/bin/sh
# `claude plugin install` that forks a helper and hangs: the helper records its pid
sleep 1000 &
echo $! > "$HOME/helper.pid"
wait
"""


async def test_plugin_command_timeout_kills_what_it_forked(env: Env) -> None:
    claude = env.base / "claude"
    claude.write_text(HANGING_CLAUDE)
    os.chmod(claude, 0o755)
    ctx = BootContext(env.settings(plugins="commit-commands@cc"), EventBus())
    engine = BootEngine([plugins_step(env.user, claude=str(claude), command_timeout=1.0)], ctx)
    assert (await engine.run()).value == "DEGRADED"
    assert "timed out after 1s" in engine.records["plugins"].reason
    helper = int((env.home / "helper.pid").read_text())
    try:
        watch = runner.ExitWatch(helper)
    except ProcessLookupError:
        return  # gone and reaped
    try:
        await asyncio.wait([watch.exited], timeout=5)
        assert watch.exited.done(), "the plugin command's child survived its timeout"
    finally:
        watch.close()
        if not watch.exited.done():
            os.kill(helper, signal.SIGKILL)


async def test_status_samples_the_agent_at_most_once_a_second(env: Env) -> None:
    sm = manager(env, EventBus())
    await sm.start()
    mon = asyncio.create_task(sm.monitor())
    try:
        await until(lambda: (st := sm.status())["agent"] is not None and st, what="agent sample")
        before = sm._usage.samples
        t0 = time.monotonic()
        for _ in range(200):
            st = sm.status()
        if time.monotonic() - t0 < 1.0:
            assert sm._usage.samples - before <= 1, "status re-sampled the process tree"
        assert st["agent"]["rss_bytes"] > 0 and st["mounts"]
        pid = next(p.pid for p in sm.snapshot.panes if p.role == "agent")  # type: ignore[union-attr]
        os.kill(pid or 0, signal.SIGKILL)
        # a respawned agent (another pid) is sampled at once, not a second later
        await until(lambda: (a := sm.status()["agent"]) is not None and a["pid"] != pid,
                    what="the new agent's figures")
    finally:
        await sm.stop()
        await mon
