"""SessionManager policy with tmux behind a seam: no processes, a fake clock."""

from __future__ import annotations

import types
from typing import Any

import pytest
from codetainer.boot.privileges import AgentUser
from codetainer.events import EventBus
from codetainer.session import tmux as tmux_mod
from codetainer.session.tmux import (
    TRANSITIONS,
    InvalidTransition,
    SessionError,
    SessionManager,
    SessionState,
    TmuxGone,
)
from codetainer.session.tmuxctl import Pane, Snapshot
from codetainer.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeManager(SessionManager):
    def __init__(self, policy: str = "respawn", **kw: Any) -> None:
        settings = Settings(tmux_socket="/nonexistent/tmux/agent.sock", agent_restart=policy,
                            workspace="/nonexistent/ws")
        self.bus = EventBus()
        super().__init__(settings, self.bus, {}, AgentUser("claude", 1000, 1000, "/h"),
                         backoff_base=1.0, backoff_max=8.0, stable_after=30.0, **kw)
        self.calls: list[tuple[str, ...]] = []
        self.next: Snapshot | Exception | None = None
        self.create_failures = 0
        self.created = 0

    async def _tmux(self, *args: str) -> str:
        self.calls.append(args)
        return "%9\n" if "-P" in args else ""

    async def _query(self) -> Snapshot:
        if self.next is None:  # start() looks once; tests set what check() sees
            raise TmuxGone("no snapshot given")
        if isinstance(self.next, Exception):
            raise self.next
        return self.next

    async def _create(self) -> None:
        if self.create_failures:
            self.create_failures -= 1
            raise SessionError("tmux new-session failed: boom", "fix it")
        self.created += 1
        self._adopted(f"${self.created - 1}", "%0", "%1", 40 + self.created, "/w")

    def names(self) -> list[str]:
        return [e["event"] for e in self.bus.history]


def snap(dead: bool = False, pid: int = 41, panes: tuple[str, ...] = ("%0", "%1"),
         status: int | None = 1) -> Snapshot:
    out = Snapshot("$0", "claude", 40)
    for i, pane_id in enumerate(panes):
        agent = pane_id == "%0"
        out.panes.append(Pane(pane_id, i, dead and agent, status if dead and agent else None,
                              None, pid if agent else 50, "claude" if agent else "bash",
                              "agent" if agent else "shell"))
    return out


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(tmux_mod, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


def respawns(m: FakeManager) -> int:
    return sum(1 for c in m.calls if c[0] == "respawn-pane")


def test_transition_table_is_guarded() -> None:
    m = FakeManager()
    with pytest.raises(InvalidTransition, match="STOPPED -> RUNNING"):
        m.change_state(SessionState.RUNNING)
    reachable = {s for targets in TRANSITIONS.values() for s in targets}
    assert reachable | {SessionState.STOPPED} == set(SessionState)
    assert TRANSITIONS[SessionState.STOPPING] == frozenset({SessionState.STOPPED})


def test_bad_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CODETAINER_AGENT_RESTART='sometimes'"):
        FakeManager(policy="sometimes")


async def test_start_publishes_ready_and_failure_allows_retry(clock: Clock) -> None:
    m = FakeManager()
    assert m.attach_target() is None and m.describe()["exists"] is False
    m.create_failures = 1
    with pytest.raises(SessionError):
        await m.start()
    assert m.state is SessionState.FAILED
    assert m.describe()["reason"] == "tmux new-session failed: boom"
    assert m.names() == ["session.failed"]
    info = await m.start()  # FAILED -> STARTING is allowed
    assert info["exists"] and info["id"] == "$0" and info["reason"] == ""
    assert m.names()[-1] == "session.ready"
    assert m.attach_target() == {"socket": m.socket, "id": "$0", "agent_pane": "%0",
                                 "user": "claude", "uid": 1000, "gid": 1000, "home": "/h",
                                 # attach's client runs under the agent's limits too
                                 "limits": m.limits().as_dict()}


async def test_agent_death_respawns_with_growing_backoff(clock: Clock) -> None:
    m = FakeManager()
    await m.start()
    m.next = snap()
    await m.check()
    for expected_delay, n in ((1.0, 1), (2.0, 2), (4.0, 3), (8.0, 4), (8.0, 5)):
        clock.now += 0.5  # a short run
        m.next = snap(dead=True, pid=100 + n)
        await m.check()
        assert m.bus.history[-1]["action"] == f"respawn in {expected_delay:g}s"
        clock.now += expected_delay - 0.01
        await m.check()
        assert respawns(m) == n - 1, "no respawn before the backoff elapsed"
        clock.now += 0.02
        await m.check()
        assert respawns(m) == n
        m.next = snap(pid=200 + n)
        await m.check()
    assert m.restarts == {"agent": 5, "server": 0}
    assert m.names().count("session.respawned") == 5


async def test_a_stable_run_resets_the_backoff(clock: Clock) -> None:
    m = FakeManager()
    await m.start()
    m.next = snap(pid=1)
    await m.check()
    clock.now += 0.1
    m.next = snap(dead=True, pid=1)
    await m.check()
    clock.now += 1.0
    await m.check()
    m.next = snap(pid=2)
    await m.check()
    clock.now += 31  # ran longer than stable_after
    await m.check()
    m.next = snap(dead=True, pid=2)
    await m.check()
    assert m.bus.history[-1]["action"] == "respawn in 1s"


async def test_gives_up_after_rapid_failures(clock: Clock) -> None:
    m = FakeManager(max_rapid_restarts=2)
    await m.start()
    for n in range(3):
        m.next = snap(pid=10 + n)
        await m.check()
        clock.now += 0.1
        m.next = snap(dead=True, pid=10 + n)
        await m.check()
        clock.now += 10
        await m.check()
    assert respawns(m) == 2
    assert m.names()[-1] == "session.gave_up"
    assert m.status()["gave_up"] is True and "3 times in a row" in m.reason
    clock.now += 100
    await m.check()
    assert respawns(m) == 2


async def test_leave_policy_never_respawns(clock: Clock) -> None:
    m = FakeManager(policy="leave")
    await m.start()
    m.next = snap(dead=True, pid=5)
    await m.check()
    clock.now += 1000
    await m.check()
    await m.check()
    assert respawns(m) == 0
    assert m.names().count("session.agent_exited") == 1
    assert m.bus.history[-1]["action"] == "left"


async def test_closed_agent_pane_is_replaced_on_top(clock: Clock) -> None:
    m = FakeManager()
    await m.start()
    m.next = snap(panes=("%1",))
    await m.check()
    split = next(c for c in m.calls if c[0] == "split-window")
    assert "-b" in split and "80%" in split and "%1" in split
    assert m.agent_pane == "%9" and m.restarts["agent"] == 1


async def test_lost_server_is_recreated_with_backoff_then_gives_up(clock: Clock) -> None:
    m = FakeManager(recreate_limit=3)
    await m.start()
    m.next = TmuxGone("no server running on /x")
    await m.check()
    assert m.state is SessionState.RUNNING and m.restarts["server"] == 1
    assert m.names()[-3:] == ["session.lost", "session.recreated", "session.ready"]
    assert m.session_id == "$1"
    # now the server keeps failing to come back
    m.create_failures = 10
    await m.check()
    assert m.state.value == "RECOVERING"
    await m.check()  # within the backoff: no new attempt
    assert m.create_failures == 9
    clock.now += 1.0
    await m.check()
    clock.now += 2.0
    await m.check()
    assert m.state.value == "FAILED" and m.names()[-1] == "session.failed"
    assert "after 3 attempts" in m.reason


async def test_query_timeouts_are_not_a_loss(clock: Clock) -> None:
    m = FakeManager()
    await m.start()
    m.next = SessionError("tmux did not answer within 5s")
    await m.check()
    assert m.state is SessionState.RUNNING and "session.lost" not in m.names()


async def test_session_handler_reports_failure_reason(clock: Clock) -> None:
    m = FakeManager()
    m.create_failures = 1
    with pytest.raises(SessionError):
        await m.start()
    info = await m.session_handler(None)
    assert info == {"exists": False, "socket": m.socket, "id": None, "name": None,
                    "agent_pane": None, "state": "FAILED",
                    "reason": "tmux new-session failed: boom", "hint": "fix it",
                    "user": "claude", "uid": 1000, "gid": 1000, "home": "/h",
                    "limits": m.limits().as_dict()}


@pytest.mark.parametrize("exc", [IndexError("list index out of range"), FileNotFoundError(2, "gone")])
def test_a_process_vanishing_mid_read_is_gone_not_a_crash(monkeypatch: pytest.MonkeyPatch,
                                                           exc: Exception) -> None:
    """psutil can fail with IndexError when /proc/<pid>/stat reads empty as the process
    exits (seen in CI while tmux stopped): the session treats it as gone."""
    import psutil

    def vanishing(pid: int) -> psutil.Process:
        raise exc

    m = FakeManager()
    m.server_pid = 4242
    monkeypatch.setattr(psutil, "Process", vanishing)
    assert m._tree_pids() == []


def test_pids_the_agents_tmux_reports_are_acted_on_only_when_they_are_the_agents() -> None:
    """A tmux server on the agent's socket can report any pid as its own (a fake server
    naming the init or the DNS server): the daemon signals and samples only processes of
    the agent's uid."""
    import os
    import subprocess

    m = FakeManager()
    m.server_pid = os.getpid()  # root's: the test runner itself
    assert m._tree_pids() == []
    child = subprocess.Popen(["sleep", "30"], user=1000, group=1000)
    try:
        m.server_pid = child.pid
        assert m._tree_pids() == [child.pid]
    finally:
        child.kill()
        child.wait()
