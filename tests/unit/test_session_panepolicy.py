"""The agent pane's restart policy on the service FSM, driven with a fake clock (no tmux)."""

from __future__ import annotations

import signal

import pytest
from codetainer.services.config import ExponentialBackoff
from codetainer.services.states import ProcessState
from codetainer.session.panepolicy import AgentExit, PanePolicy, pane_config, wait_status
from codetainer.session.tmuxctl import Pane
from codetainer.settings import AgentRestart


def policy(restart: AgentRestart = "respawn", max_rapid: int = 10) -> PanePolicy:
    return PanePolicy(pane_config(restart, stable_after=30.0, max_rapid_restarts=max_rapid,
                                  backoff_base=1.0, backoff_max=8.0))


def dead(pid: int, status: int | None = 1, sig: str | None = None) -> Pane:
    return Pane("%0", 0, True, status, sig, pid, "claude", "agent")


class Run:
    """One agent pane under a policy, on a fake clock: what ``SessionManager.check`` does."""

    def __init__(self, p: PanePolicy) -> None:
        self.p, self.now, self.pid, self.respawns = p, 1000.0, 100, 0
        p.started(self.now)  # the session's creation
        p.alive(self.now, self.pid)

    def dies_after(self, ran: float) -> AgentExit:
        self.now += ran
        self.p.alive(self.now, self.pid)
        out = self.p.dead(self.now, dead(self.pid))
        assert out is not None
        assert self.p.dead(self.now, dead(self.pid)) is None, "one decision per death"
        return out

    def respawned_after(self, wait: float) -> bool:
        """Poll until ``wait`` seconds later; respawn when due (the new pid seen at once)."""
        self.now += wait - 0.01
        if self.p.due(self.now):
            return False  # too early
        self.now += 0.01
        if not self.p.due(self.now):
            return False
        self.p.respawned()
        self.respawns += 1
        self.pid += 1
        self.p.alive(self.now, self.pid)
        return True


def test_the_settings_become_a_service_config() -> None:
    cfg = pane_config("respawn", stable_after=30.0, max_rapid_restarts=4,
                      backoff_base=0.5, backoff_max=60.0)
    assert (cfg.autorestart, cfg.startsecs, cfg.startretries) == ("true", 30.0, 4)
    assert cfg.backoff == ExponentialBackoff(0.5, 60.0)
    leave = pane_config("leave", stable_after=30.0, max_rapid_restarts=4,
                        backoff_base=0.5, backoff_max=60.0)
    assert (leave.autorestart, leave.startsecs) == ("false", 0.0)


def test_respawn_with_the_exponential_backoff() -> None:
    run = Run(policy())
    for n, delay in enumerate((1, 2, 4, 8, 8), 1):
        out = run.dies_after(0.5)
        assert (out.action, out.ran, out.rapid) == (f"respawn in {delay}s", 0.5, n)
        assert run.respawned_after(delay), f"respawned {delay}s after death {n}"
    assert run.respawns == 5 and not run.p.gave_up


def test_gives_up_after_max_rapid_restarts_short_runs() -> None:
    run = Run(policy(max_rapid=2))
    assert run.dies_after(0.1).action == "respawn in 1s"
    assert run.respawned_after(1)
    assert run.dies_after(0.1).action == "respawn in 2s"
    assert run.respawned_after(2)
    out = run.dies_after(0.1)
    assert out.gave_up and out.rapid == 3 and run.p.gave_up
    assert run.p.fsm.state is ProcessState.FATAL
    run.now += 3600
    assert not run.p.due(run.now), "FATAL: never respawned"


def test_a_stable_run_resets_the_series() -> None:
    run = Run(policy(max_rapid=2))
    assert run.dies_after(0.1).action == "respawn in 1s"
    assert run.respawned_after(1)
    assert run.dies_after(0.1).action == "respawn in 2s"
    assert run.respawned_after(2)
    run.now += 30  # ran stable_after: RUNNING, the count is back to 0
    run.p.alive(run.now, run.pid)
    assert run.p.fsm.state is ProcessState.RUNNING and run.p.fsm.backoff == 0
    out = run.dies_after(5)
    # an exit after a stable run is the first of a new series, as the pane always had it
    assert (out.action, out.ran, out.rapid) == ("respawn in 1s", 35.0, 1)
    assert run.respawned_after(1)
    assert run.dies_after(0.1).action == "respawn in 2s"
    assert run.respawned_after(2)
    assert run.dies_after(0.1).gave_up


def test_leave_never_respawns() -> None:
    run = Run(policy("leave"))
    out = run.dies_after(0.1)
    assert (out.action, out.gave_up) == ("left", False)
    run.now += 3600
    assert not run.p.due(run.now)
    assert not run.p.replaces_closed_pane
    assert run.p.fsm.state is ProcessState.EXITED and not run.p.gave_up


def test_an_operators_respawn_after_giving_up_keeps_the_count() -> None:
    run = Run(policy(max_rapid=1))
    run.dies_after(0.1)
    assert run.respawned_after(1)
    assert run.dies_after(0.1).gave_up
    run.pid = 500  # `tmux respawn-pane` by hand
    run.p.alive(run.now, run.pid)
    assert not run.p.gave_up and run.p.fsm.state is ProcessState.STARTING
    assert run.dies_after(0.1).gave_up, "another short run: given up again at once"
    run.pid = 600
    run.p.alive(run.now, run.pid)
    run.now += 30
    run.p.alive(run.now, run.pid)
    assert run.dies_after(1).action == "respawn in 1s", "a stable run: a new series"


def test_a_failed_respawn_is_a_failed_start() -> None:
    run = Run(policy(max_rapid=2))
    run.dies_after(0.1)
    run.now += 1
    assert run.p.due(run.now)
    out = run.p.respawn_failed(run.now, "tmux respawn-pane failed: boom")
    assert (out.action, out.ran, out.rapid) == ("respawn in 2s", 0.1, 2)
    run.now += 2
    assert run.p.due(run.now)
    assert run.p.respawn_failed(run.now, "boom").gave_up


def test_a_closed_pane_replaced_starts_a_run() -> None:
    run = Run(policy())
    assert run.p.replaces_closed_pane
    run.now += 40
    run.p.alive(run.now, run.pid)
    run.p.started(run.now)  # the pane was closed and put back
    run.p.alive(run.now, 900)
    assert run.p.fsm.state is ProcessState.STARTING and run.p.fsm.pid == 900
    run.pid = 900
    out = run.dies_after(0.2)
    assert (out.ran, out.action) == (0.2, "respawn in 1s")


def test_a_death_between_polls_is_decided() -> None:
    run = Run(policy())
    run.dies_after(0.1)
    run.now += 1
    assert run.p.due(run.now)
    run.p.respawned()
    # the respawned agent died before any poll saw it alive
    out = run.p.dead(run.now + 0.3, dead(4242))
    assert out is not None and out.action == "respawn in 2s" and out.ran == 0.3


@pytest.mark.parametrize(("status", "sig", "decoded"), [
    (3, None, (3 << 8)),
    (None, "15", signal.SIGTERM),
    (None, "SIGKILL", signal.SIGKILL),
    (None, "HUP", signal.SIGHUP),
    (None, None, 0),
])
def test_the_pane_exit_becomes_a_wait_status(status: int | None, sig: str | None,
                                             decoded: int) -> None:
    assert wait_status(dead(1, status, sig)) == decoded
