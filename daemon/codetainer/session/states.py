"""The agent session's lifecycle: its states and the transitions between them (one
guard, :func:`codetainer.lifecycle.transition`, in ``SessionManager.change_state``)."""

from __future__ import annotations

import enum


class SessionState(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    FAILED = "FAILED"
    STOPPING = "STOPPING"


S = SessionState
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.STOPPED: frozenset({S.STARTING, S.STOPPING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING}),
    S.RUNNING: frozenset({S.RECOVERING, S.STOPPING}),
    S.RECOVERING: frozenset({S.RUNNING, S.FAILED, S.STOPPING}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
}
