"""supervisord's process states, transitions and wait-status decoding.

Values and names are supervisord's (``supervisor/states.py``), so an operator's
knowledge carries over. The transition table below is the one documented in
supervisord's ``docs/subprocess.rst``; ``tests/unit/test_service_fsm.py`` checks it. The
guard (``InvalidTransition``) is every lifecycle's, from ``codetainer.lifecycle``.
"""

from __future__ import annotations

import enum
import os
import signal

from codetainer.lifecycle import InvalidTransition  # noqa: F401 - raised by change_state; callers import it here


class ProcessState(enum.IntEnum):
    STOPPED = 0
    STARTING = 10
    RUNNING = 20
    BACKOFF = 30
    STOPPING = 40
    EXITED = 100
    FATAL = 200
    UNKNOWN = 1000


S = ProcessState
TRANSITIONS: dict[ProcessState, frozenset[ProcessState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.STOPPING}),
    S.RUNNING: frozenset({S.STOPPING, S.EXITED}),
    S.BACKOFF: frozenset({S.STARTING, S.FATAL, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.EXITED: frozenset({S.STARTING}),
    S.FATAL: frozenset({S.STARTING}),
    S.UNKNOWN: frozenset(),
}
del S


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def decode_wait_status(status: int) -> tuple[int, str]:
    """Turn a raw wait status into ``(code, message)``.

    ``code`` is the exit code, or ``-signum`` when killed by a signal. The message is
    what status shows: ``"exited 7"`` or ``"killed by SIGKILL (core dumped)"``.
    """
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return code, f"exited {code}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        msg = f"killed by {signame(sig)}"
        if os.WCOREDUMP(status):
            msg += " (core dumped)"
        return -sig, msg
    return -1, f"unknown wait status {status:#x}"
