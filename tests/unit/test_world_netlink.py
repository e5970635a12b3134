"""The test world's netlink setup runs in a worker thread under a deadline
(``sandbox/world._off_loop``): an answer that never comes fails the world, naming it."""

from __future__ import annotations

import asyncio
import threading

import pytest
from codetainer.sandbox.world import _off_loop


def test_a_setup_that_never_answers_fails_at_the_deadline() -> None:
    never = threading.Event()  # set after the check, so the worker ends
    with pytest.raises(RuntimeError, match=r"no answer within 0\.2 s"):
        _off_loop(never.wait, deadline=0.2)
    never.set()


def test_its_errors_reach_the_caller_and_it_runs_beside_a_running_loop() -> None:
    def fails() -> None:
        raise ValueError("step x failed")

    with pytest.raises(ValueError, match="step x failed"):
        _off_loop(fails)

    async def inside() -> list[str]:
        ran: list[str] = []
        _off_loop(lambda: ran.append(threading.current_thread().name))
        return ran

    assert asyncio.run(inside()) == ["world-netlink"]
