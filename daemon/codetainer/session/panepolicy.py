"""The agent pane's restart policy, on the service state machine (``services/fsm.py``).

The agent in its tmux pane is supervised as one program, with the session's settings as
its ``ServiceConfig``:

=========================  ==========================================================
``respawn``                ``autorestart=true``; ``startsecs`` = ``stable_after`` (a run
                           shorter than that is a failed start), ``startretries`` =
                           ``max_rapid_restarts``, and the capped exponential backoff
                           (``backoff_base`` doubled per exit in a row, at most
                           ``backoff_max``; an exit after a stable run waits
                           ``backoff_base`` and starts a new series)
``leave``                  ``autorestart=false``, ``startsecs=0`` (nothing is retried,
                           so no start fails): a dead pane stays for the operator
=========================  ==========================================================

The pane's events are the FSM's inputs: the session created, adopted or recreated, the
closed pane replaced, or a live agent pid no spawn of ours explains (an operator's
``respawn-pane``) is :meth:`ServiceFSM.started_outside`; the pid of the spawn we ordered
seen is ``spawned``; every poll is ``tick`` (STARTING -> RUNNING after ``stable_after``);
a dead pane (tmux's ``remain-on-exit``) is ``exited`` with its exit status or signal.
The FSM's state is the decision: BACKOFF (or EXITED awaiting its restart) is a respawn
when ``tick`` says :class:`Spawn`, EXITED with no restart wanted is "left", FATAL is
"gave up". Sans-IO like the FSM: the caller (``SessionManager``) passes the monotonic
time and runs the tmux commands; ``tests/unit/test_session_panepolicy.py`` drives it with
a fake clock.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from codetainer.services.config import ExponentialBackoff, ServiceConfig
from codetainer.services.fsm import Action, ServiceFSM, Spawn
from codetainer.services.states import ProcessState
from codetainer.session.tmuxctl import Pane
from codetainer.settings import AgentRestart


def pane_config(policy: AgentRestart, *, stable_after: float, max_rapid_restarts: int,
                backoff_base: float, backoff_max: float) -> ServiceConfig:
    """The agent pane as a supervised program (``CODETAINER_AGENT_RESTART``'s policy)."""
    respawn = policy == "respawn"
    return ServiceConfig(
        name="agent", command=(), autorestart="true" if respawn else "false",
        startsecs=stable_after if respawn else 0.0, startretries=max_rapid_restarts,
        backoff=ExponentialBackoff(backoff_base, backoff_max))


def wait_status(pane: Pane) -> int:
    """The dead pane's exit as a wait status (what ``ServiceFSM.exited`` decodes)."""
    if pane.dead_signal:
        name = pane.dead_signal
        try:
            return int(name) & 0x7F
        except ValueError:
            try:
                return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
            except KeyError:
                pass
    return ((pane.dead_status or 0) & 0xFF) << 8


@dataclass(frozen=True)
class AgentExit:
    """What was decided about one death of the agent: the fields of ``session.agent_exited``
    and, when it gave up, how many exits in a row made it."""

    ran: float  # seconds the dead agent ran
    action: str  # "respawn in 2s" | "left" | "gave_up"
    rapid: int  # exits in a row (the FSM's failed starts)

    @property
    def gave_up(self) -> bool:
        return self.action == "gave_up"


class PanePolicy:
    def __init__(self, config: ServiceConfig) -> None:
        self.fsm = ServiceFSM(config)
        self.agent_pid: int | None = None  # the live agent process last seen
        self.handled_death: int | None = None  # pane pid whose death was decided
        self._ran = 0.0
        self._spawn_ordered = False  # the FSM said Spawn, not yet carried out

    @property
    def gave_up(self) -> bool:
        return self.fsm.state is ProcessState.FATAL

    @property
    def replaces_closed_pane(self) -> bool:
        """A closed agent pane is put back (``respawn``), or not (``leave``)."""
        return self.fsm.config.autorestart != "false"

    def started(self, now: float) -> None:
        """An agent started without an order of the FSM's: the session was created, adopted
        or recreated, or the closed pane replaced; its pid comes with a later poll."""
        self.fsm.started_outside(now)
        self.agent_pid = self.handled_death = None
        self._spawn_ordered = False

    def alive(self, now: float, pid: int | None) -> None:
        """A poll found the agent's pane live with process ``pid``."""
        if pid != self.agent_pid:
            if self.fsm.state is ProcessState.STARTING and not self.fsm.pid:
                self.fsm.spawned(pid or 0)  # the start we know of
            else:  # a process no start of ours explains: an operator respawned the pane
                self.fsm.started_outside(now, pid or 0)
                self._spawn_ordered = False
            self.agent_pid, self.handled_death = pid, None
        self.fsm.tick(now)  # STARTING -> RUNNING once it ran ``startsecs``: never a Spawn

    def dead(self, now: float, pane: Pane) -> AgentExit | None:
        """A poll found the agent's pane dead: the decision, once per dead process."""
        if self.handled_death == pane.pid:
            return None
        self.handled_death, self.agent_pid = pane.pid, None
        if self.fsm.state not in (ProcessState.STARTING, ProcessState.RUNNING):
            self.fsm.started_outside(now, pane.pid or 0)  # started and died between polls
        self._ran = now - self.fsm.laststart
        self._order(self.fsm.exited(now, wait_status(pane)))
        return self._decision(now)

    def due(self, now: float) -> bool:
        """Whether the dead agent is to be respawned now (its backoff has passed)."""
        if not self._spawn_ordered:
            self._order(self.fsm.tick(now))
        return self._spawn_ordered

    def respawned(self) -> None:
        """The ordered respawn was carried out; the new pid comes with a later poll."""
        self._spawn_ordered = False
        self.agent_pid = None

    def respawn_failed(self, now: float, why: str) -> AgentExit:
        """The ordered respawn failed: a failed start, decided like the death before it."""
        self._spawn_ordered = False
        self.fsm.spawn_failed(now, why)
        self._order(self.fsm.tick(now))
        return self._decision(now)

    def _order(self, actions: list[Action]) -> None:
        self._spawn_ordered = self._spawn_ordered or any(isinstance(a, Spawn) for a in actions)

    def _decision(self, now: float) -> AgentExit:
        fsm = self.fsm
        if fsm.state is ProcessState.FATAL:
            action = "gave_up"
        elif fsm.state is ProcessState.EXITED and not fsm.wants_running:
            action = "left"
        else:  # BACKOFF, or EXITED with a restart to come (or ordered already: at once)
            delay = 0.0 if self._spawn_ordered else max(0.0, fsm.delay - now)
            action = f"respawn in {delay:g}s"
        return AgentExit(round(self._ran, 2), action, fsm.backoff)
