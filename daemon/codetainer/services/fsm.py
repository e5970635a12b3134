"""The supervisord process lifecycle as a sans-IO state machine.

No processes, no clock: the driver (``process.py``) feeds it inputs with the current
monotonic time and carries out the actions it returns. That is what makes every
``autorestart`` × ``exitcodes`` combination, BACKOFF delays and FATAL testable with a
fake clock (``tests/unit/test_service_fsm.py``), while integration tests check the
real timing.

Semantics follow supervisord's ``process.py``: ``startsecs`` to reach RUNNING; an exit
before that is BACKOFF with a delay that grows by one second per attempt; FATAL once
the attempts exceed ``startretries``; an exit from RUNNING is EXITED, and ``autorestart``
decides (``true`` always, ``unexpected`` when the code is not in ``exitcodes``).

Two additions for a program that is not a service, the agent's tmux pane
(``session/panepolicy.py``), each inert unless used, so services keep supervisord's
semantics exactly: ``ServiceConfig.backoff`` (an :class:`ExponentialBackoff` instead of
the one-more-second delay, and a delay before a restart after a run too), and
:meth:`ServiceFSM.started_outside` (a process of the program that the driver did not
spawn: an operator's ``respawn-pane``, a session created or adopted).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass

from codetainer.lifecycle import transition
from codetainer.services.config import ExponentialBackoff, ServiceConfig
from codetainer.services.states import TRANSITIONS, ProcessState, decode_wait_status


@dataclass(frozen=True)
class Spawn:
    pass


@dataclass(frozen=True)
class Kill:
    sig: int
    group: bool


Action = Spawn | Kill


class ServiceFSM:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.state = ProcessState.STOPPED
        self.pid = 0
        self.laststart = 0.0  # monotonic time of the last spawn, 0 = never
        self.backoff = 0  # failed start attempts in a row
        self.delay = 0.0  # BACKOFF: when to retry; STOPPING: when to SIGKILL
        self.killing = False  # a stop was requested for the current process
        self.last_exit = ""  # "exited 7" / "killed by SIGKILL"
        self.spawnerr = ""
        self.expected: bool | None = None
        self.starts = 0  # number of spawns, for "restarts"
        self.wants_running = False  # asked to be up (start/autostart) and not since stopped
        #: called with (old, new) after every state change: the driver wakes its waiters
        self.on_change: Callable[[ProcessState, ProcessState], None] | None = None

    # -- the one place state changes ------------------------------------------------
    def change_state(self, new: ProcessState) -> ProcessState:
        old = self.state
        self.state = transition(TRANSITIONS, old, new, f"service {self.config.name}:")
        if self.on_change is not None:
            self.on_change(old, new)
        return old

    # -- inputs ------------------------------------------------------------------------
    def request_start(self, now: float) -> list[Action]:
        if self.state in (ProcessState.STARTING, ProcessState.RUNNING, ProcessState.STOPPING):
            return []
        self.wants_running = True
        if self.state is ProcessState.BACKOFF:
            return []  # already retrying
        self.backoff = 0
        return self._spawn(now)

    def _spawn(self, now: float) -> list[Action]:
        # STOPPED/EXITED/FATAL/BACKOFF -> STARTING
        self.change_state(ProcessState.STARTING)
        self.laststart = now
        self.spawnerr = ""
        self.killing = False
        self.starts += 1
        return [Spawn()]

    def spawned(self, pid: int) -> None:
        self.pid = pid

    def spawn_failed(self, now: float, err: str) -> None:
        # STARTING -> BACKOFF
        self.spawnerr = err
        self.pid = 0
        self._backoff(now)

    def _backoff(self, now: float) -> None:
        self.change_state(ProcessState.BACKOFF)
        self.backoff += 1
        self.delay = now + self._wait(self.backoff)

    def _wait(self, failures: int) -> float:
        curve: ExponentialBackoff | None = self.config.backoff
        return float(failures) if curve is None else curve.delay(failures)

    def started_outside(self, now: float, pid: int = 0) -> None:
        """A process of this program that the driver did not spawn (it appears, or will be
        reported by :meth:`spawned`): STARTING from ``now``, the failed starts in a row
        kept. supervisord has no such input, all its processes are its own; the agent's
        tmux pane can be respawned by an operator, or created with its session."""
        if self.state is ProcessState.RUNNING:
            self.change_state(ProcessState.EXITED)  # RUNNING -> EXITED: it ended unseen
        if self.state is not ProcessState.STARTING:
            # STOPPED/EXITED/FATAL/BACKOFF -> STARTING
            self.change_state(ProcessState.STARTING)
        self.laststart = now
        self.pid = pid
        self.spawnerr = ""
        self.killing = False
        self.wants_running = True

    def request_stop(self, now: float) -> list[Action]:
        self.wants_running = False
        if self.state is ProcessState.BACKOFF:
            # BACKOFF -> STOPPED: nothing is running, just stop retrying
            self.change_state(ProcessState.STOPPED)
            return []
        if self.state in (ProcessState.RUNNING, ProcessState.STARTING):
            # RUNNING/STARTING -> STOPPING
            self.change_state(ProcessState.STOPPING)
            self.killing = True
            self.delay = now + self.config.stopwaitsecs
            return [Kill(self.config.stopsignal, self.config.stopasgroup)]
        return []

    def exited(self, now: float, status: int) -> list[Action]:
        code, msg = decode_wait_status(status)
        self.pid = 0
        self.last_exit = msg
        too_quickly = now - self.laststart < self.config.startsecs
        self.expected = code in self.config.exitcodes
        if self.killing:
            # STOPPING -> STOPPED
            self.killing = False
            self.change_state(ProcessState.STOPPED)
            return []
        if self.state is ProcessState.STARTING and too_quickly:
            # STARTING -> BACKOFF: never made it to RUNNING
            self.spawnerr = f"exited too quickly ({msg})"
            self._backoff(now)
            return self.tick(now)
        self.backoff = 0
        if self.state is ProcessState.STARTING:
            self.change_state(ProcessState.RUNNING)  # startsecs elapsed while unobserved
        # RUNNING -> EXITED
        self.change_state(ProcessState.EXITED)
        self.delay = now
        if self.config.backoff is not None:  # the first exit of a new series waits too
            self.backoff = 1
            self.delay = now + self._wait(1)
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Evaluate timers; call whenever ``next_deadline()`` passes."""
        st = self.state
        if st is ProcessState.STARTING:
            if now - self.laststart >= self.config.startsecs and self.pid:
                # STARTING -> RUNNING
                self.change_state(ProcessState.RUNNING)
                self.backoff = 0
                self.delay = 0.0
        elif st is ProcessState.BACKOFF:
            if self.backoff > self.config.startretries:
                # BACKOFF -> FATAL
                self.change_state(ProcessState.FATAL)
                self.wants_running = False
            elif now >= self.delay:
                # BACKOFF -> STARTING
                return self._spawn(now)
        elif st is ProcessState.STOPPING:
            if now >= self.delay and self.pid:
                self.delay = now + 3600.0  # one SIGKILL; the exit ends STOPPING
                return [Kill(signal.SIGKILL, self.config.killasgroup)]
        elif st is ProcessState.EXITED and self.wants_running:
            restart = self.config.autorestart
            if restart == "true" or (restart == "unexpected" and not self.expected):
                if now < self.delay:
                    return []
                # EXITED -> STARTING
                return self._spawn(now)
            self.wants_running = False
        return []

    def next_deadline(self) -> float | None:
        st = self.state
        if st is ProcessState.STARTING and self.pid:
            return self.laststart + self.config.startsecs
        if st is ProcessState.BACKOFF or (st is ProcessState.EXITED and self.wants_running):
            return self.delay
        if st is ProcessState.STOPPING:
            return self.delay
        return None
