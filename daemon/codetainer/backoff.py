"""The one backoff: tenacity's capped exponential wait (``first``, ``2*first``, ``4*first``
... up to ``cap``), on the monotonic clock, with a limit (STYLE rules 5 and 13).

Three shapes of waiting take it from here:

* a call retried until it works (the clone, the DNS guard's revival, the proxy's
  repository lookup, the DNS health check): tenacity's ``AsyncRetrying`` itself, with
  ``wait=exponential(first, cap)`` and a ``stop``;
* a condition nothing signals (a port that listens, a server that answers): :func:`until`,
  the same ``AsyncRetrying`` retrying the check while it says "not yet", to a deadline;
* a retry that is no loop but a time before which nothing is tried again (the set helper
  started again on a later transaction, the agent's pane respawned on a later tick):
  :func:`delay`, what tenacity would sleep before that attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
)


def exponential(first: float, cap: float) -> wait_exponential:
    """tenacity's wait before attempt n+1: ``first * 2**(n-1)``, at most ``cap`` seconds."""
    return wait_exponential(multiplier=first, max=cap)


@dataclass(frozen=True)
class _Attempt:
    """What :class:`wait_exponential` reads of a ``RetryCallState``."""

    attempt_number: int


def delay(failures: int, first: float, cap: float) -> float:
    """Seconds to wait after ``failures`` failures in a row (1: ``first``) before the next
    try, for retries scheduled on a clock rather than slept in a loop."""
    if failures < 1:
        return 0.0
    return float(exponential(first, cap)(cast(RetryCallState, _Attempt(failures))))


def last_result(state: RetryCallState) -> Any:
    """A ``retry_error_callback``: out of attempts, the last attempt's result (or its
    exception, raised) rather than tenacity's ``RetryError``."""
    if state.outcome is None:
        raise RuntimeError("no attempt was made")
    return state.outcome.result()


def _not_yet(done: bool) -> bool:
    return not done


def _timed_out(state: RetryCallState) -> bool:
    return False


async def until(check: Callable[[], Awaitable[bool]], *, timeout: float, first: float = 0.02,
                cap: float = 0.25) -> bool:
    """Call ``check`` until it returns True (True) or ``timeout`` seconds have passed
    (False: its last call started within ``cap`` seconds of the deadline and ended after
    it). For conditions that cannot wake us; a state that can is awaited instead."""
    retrying = AsyncRetrying(stop=stop_after_delay(timeout), wait=exponential(first, cap),
                             retry=retry_if_result(_not_yet), retry_error_callback=_timed_out)
    return bool(await retrying(check))
