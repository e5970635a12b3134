"""supervisord's lifecycle, driven with a fake clock (no processes)."""

from __future__ import annotations

import itertools
import os
import signal

import pytest
from codetainer.services.config import ExponentialBackoff, ServiceConfig
from codetainer.services.fsm import Kill, ServiceFSM, Spawn
from codetainer.services.states import (
    TRANSITIONS,
    InvalidTransition,
    decode_wait_status,
)
from codetainer.services.states import (
    ProcessState as S,
)


def exit_status(code: int) -> int:
    return code << 8


def signal_status(sig: int, core: bool = False) -> int:
    return sig | (0x80 if core else 0)


def cfg(**kw: object) -> ServiceConfig:
    base: dict[str, object] = {"name": "svc", "command": ("/bin/true",), "startsecs": 1.0,
                               "startretries": 3, "stopwaitsecs": 10.0}
    base.update(kw)
    return ServiceConfig(**base)  # type: ignore[arg-type]


def running(fsm: ServiceFSM, now: float = 0.0) -> float:
    assert fsm.request_start(now) == [Spawn()]
    fsm.spawned(100)
    now += fsm.config.startsecs
    fsm.tick(now)
    assert fsm.state is S.RUNNING
    return now


def test_transition_table_matches_supervisord_docs() -> None:
    assert TRANSITIONS[S.STOPPED] == {S.STARTING}
    assert TRANSITIONS[S.STARTING] == {S.RUNNING, S.BACKOFF, S.STOPPING}
    assert TRANSITIONS[S.RUNNING] == {S.STOPPING, S.EXITED}
    assert TRANSITIONS[S.BACKOFF] == {S.STARTING, S.FATAL, S.STOPPED}
    assert TRANSITIONS[S.STOPPING] == {S.STOPPED}
    assert TRANSITIONS[S.EXITED] == {S.STARTING}
    assert TRANSITIONS[S.FATAL] == {S.STARTING}


def test_invalid_transition_raises() -> None:
    fsm = ServiceFSM(cfg())
    with pytest.raises(InvalidTransition, match="STOPPED -> RUNNING"):
        fsm.change_state(S.RUNNING)


def test_running_only_after_startsecs() -> None:
    fsm = ServiceFSM(cfg(startsecs=5.0))
    fsm.request_start(0.0)
    fsm.spawned(42)
    assert fsm.next_deadline() == 5.0
    fsm.tick(4.99)
    assert fsm.state is S.STARTING
    fsm.tick(5.0)
    assert fsm.state is S.RUNNING


def test_backoff_delay_grows_then_fatal_after_startretries() -> None:
    fsm = ServiceFSM(cfg(startsecs=1.0, startretries=3))
    now = 0.0
    fsm.request_start(now)
    fsm.spawned(1)
    delays = []
    for attempt in range(1, 5):
        now += 0.1
        actions = fsm.exited(now, exit_status(1))  # before startsecs: too quickly
        if attempt <= 3:
            assert fsm.state is S.BACKOFF
            assert actions == []
            delays.append(fsm.delay - now)
            assert fsm.tick(fsm.delay - 0.01) == []  # not yet
            now = fsm.delay
            assert fsm.tick(now) == [Spawn()]
            assert fsm.state is S.STARTING
            fsm.spawned(attempt + 1)
        else:
            assert fsm.state is S.FATAL
    assert delays == pytest.approx([1.0, 2.0, 3.0])
    assert fsm.starts == 4  # the first try plus startretries


def test_spawn_error_goes_to_backoff() -> None:
    fsm = ServiceFSM(cfg(startretries=0))
    fsm.request_start(0.0)
    fsm.spawn_failed(0.0, "cannot start /nope: No such file")
    assert fsm.state is S.BACKOFF
    fsm.tick(0.0)
    assert fsm.state is S.FATAL


@pytest.mark.parametrize(
    ("autorestart", "exitcodes", "code", "restarts"),
    [
        (ar, ec, code, ar == "true" or (ar == "unexpected" and code not in ec))
        for ar, ec, code in itertools.product(
            ("true", "false", "unexpected"), ((0,), (0, 2), (7,)), (0, 2, 7)
        )
    ],
)
def test_autorestart_by_exitcodes(autorestart: str, exitcodes: tuple[int, ...], code: int,
                                  restarts: bool) -> None:
    fsm = ServiceFSM(cfg(autorestart=autorestart, exitcodes=exitcodes))
    now = running(fsm)
    actions = fsm.exited(now + 10, exit_status(code))
    assert fsm.expected is (code in exitcodes)
    if restarts:
        assert actions == [Spawn()]
        assert fsm.state is S.STARTING
    else:
        assert actions == []
        assert fsm.state is S.EXITED


def test_killed_by_signal_is_unexpected() -> None:
    fsm = ServiceFSM(cfg(autorestart="unexpected"))
    now = running(fsm)
    assert fsm.exited(now + 1, signal_status(signal.SIGKILL)) == [Spawn()]
    assert fsm.last_exit == "killed by SIGKILL"


def test_stop_during_backoff_goes_to_stopped() -> None:
    fsm = ServiceFSM(cfg())
    fsm.request_start(0.0)
    fsm.spawned(1)
    fsm.exited(0.1, exit_status(1))
    assert fsm.state is S.BACKOFF
    assert fsm.request_stop(0.2) == []
    assert fsm.state is S.STOPPED
    assert fsm.tick(100.0) == []  # no retry after stop


def test_stop_sends_stopsignal_then_sigkill_at_stopwaitsecs() -> None:
    fsm = ServiceFSM(cfg(stopsignal=signal.SIGINT, stopwaitsecs=3.0, stopasgroup=True,
                         killasgroup=True))
    now = running(fsm)
    assert fsm.request_stop(now) == [Kill(signal.SIGINT, True)]
    assert fsm.state is S.STOPPING
    assert fsm.next_deadline() == now + 3.0
    assert fsm.tick(now + 2.9) == []
    assert fsm.tick(now + 3.0) == [Kill(signal.SIGKILL, True)]
    assert fsm.tick(now + 3.5) == []  # one SIGKILL only
    fsm.exited(now + 3.6, signal_status(signal.SIGKILL))
    assert fsm.state is S.STOPPED


def test_exit_while_stopping_is_stopped_not_restarted() -> None:
    fsm = ServiceFSM(cfg(autorestart="true"))
    now = running(fsm)
    fsm.request_stop(now)
    assert fsm.exited(now + 0.5, exit_status(0)) == []
    assert fsm.state is S.STOPPED


def test_start_from_fatal_and_exited() -> None:
    fsm = ServiceFSM(cfg(startretries=0))
    fsm.request_start(0.0)
    fsm.spawned(1)
    fsm.exited(0.1, exit_status(1))
    fsm.tick(0.1)
    assert fsm.state is S.FATAL
    assert fsm.request_start(5.0) == [Spawn()]
    assert fsm.state is S.STARTING


def test_decode_wait_status() -> None:
    assert decode_wait_status(exit_status(7)) == (7, "exited 7")
    assert decode_wait_status(signal_status(signal.SIGKILL)) == (-9, "killed by SIGKILL")
    code, msg = decode_wait_status(signal_status(signal.SIGSEGV, core=True))
    assert (code, msg) == (-11, "killed by SIGSEGV (core dumped)")
    # the encodings above are what the kernel produces
    assert os.WEXITSTATUS(exit_status(7)) == 7


# -- the additions the agent's tmux pane uses (session/panepolicy.py) -----------------------


def test_exponential_backoff_replaces_the_one_more_second() -> None:
    fsm = ServiceFSM(cfg(autorestart="true", startsecs=30.0, startretries=4,
                         backoff=ExponentialBackoff(1.0, 8.0)))
    now = 0.0
    fsm.request_start(now)
    waits = []
    for _ in range(4):
        fsm.spawned(1)
        now += 0.5
        assert fsm.exited(now, exit_status(1)) == []
        assert fsm.state is S.BACKOFF
        waits.append(fsm.next_deadline() - now)  # type: ignore[operator]
        now = fsm.delay
        assert fsm.tick(now) == [Spawn()]
    assert waits == [1.0, 2.0, 4.0, 8.0]
    fsm.exited(now + 0.5, exit_status(1))
    assert fsm.state is S.FATAL and fsm.backoff == 5


def test_exponential_backoff_waits_after_a_run_too() -> None:
    fsm = ServiceFSM(cfg(autorestart="true", backoff=ExponentialBackoff(2.0, 60.0)))
    now = running(fsm)
    assert fsm.exited(now + 100, exit_status(0)) == []  # not at once, unlike supervisord
    assert fsm.state is S.EXITED and fsm.backoff == 1
    assert fsm.next_deadline() == now + 102
    assert fsm.tick(now + 101.9) == []
    assert fsm.tick(now + 102) == [Spawn()]
    fsm.exited(now + 102.5, exit_status(1))  # a short run after it: the series goes on
    assert fsm.state is S.BACKOFF and fsm.delay == now + 102.5 + 4.0


def test_supervisord_backoff_is_unchanged_by_default() -> None:
    fsm = ServiceFSM(cfg(autorestart="true"))
    assert fsm.config.backoff is None
    now = running(fsm)
    assert fsm.exited(now + 5, exit_status(0)) == [Spawn()]
    assert fsm.backoff == 0


def test_started_outside_keeps_the_failed_starts() -> None:
    fsm = ServiceFSM(cfg(startretries=1))
    fsm.request_start(0.0)
    fsm.exited(0.1, exit_status(1))
    assert fsm.tick(1.1) == [Spawn()]
    fsm.exited(1.2, exit_status(1))
    assert fsm.state is S.FATAL and not fsm.wants_running
    fsm.started_outside(50.0, 77)  # FATAL -> STARTING, not through request_start
    assert (fsm.state, fsm.pid, fsm.laststart, fsm.backoff) == (S.STARTING, 77, 50.0, 2)
    assert fsm.wants_running
    fsm.exited(50.1, exit_status(1))
    assert fsm.state is S.FATAL, "the count was kept: no retry left"
    fsm.started_outside(60.0, 78)
    fsm.tick(61.0)
    assert fsm.state is S.RUNNING and fsm.backoff == 0
    fsm.started_outside(70.0)  # RUNNING -> EXITED -> STARTING: it ended unseen
    assert (fsm.state, fsm.pid, fsm.laststart) == (S.STARTING, 0, 70.0)
