"""The DNS guard against a stand-in service: revival with capped backoff, the health
checks of a running server, an operator's stop, and what status says meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from codetainer.events import EventBus
from codetainer.network.dnscheck import HealthResult
from codetainer.network.dnsguard import DnsGuard
from codetainer.services.states import ProcessState

S = ProcessState


def health(answers: bool) -> HealthResult:
    rcode = "NXDOMAIN" if answers else "TIMEOUT"
    return HealthResult("a.test", answers, rcode, (), "x.invalid", answers, rcode, 0.0)


class Service:
    """What the guard reads of a service; every change is published like the real one."""

    def __init__(self, events: EventBus, state: ProcessState) -> None:
        self.events = events
        self.state = state
        self.fsm = SimpleNamespace(spawnerr="exited too quickly (exited 2)", last_exit="exited 2",
                                   wants_running=state is S.RUNNING, delay=0.0, backoff=0)
        self.config = SimpleNamespace(startretries=1)
        self.starts = 0

    def set(self, state: ProcessState) -> None:
        self.state = state
        self.events.publish("service.state", service="dns", state=state.name)


class Services:
    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def get(self, name: str) -> Service:
        assert name == "dns"
        return self.svc

    def start(self, name: str) -> Service:
        self.svc.starts += 1
        self.svc.fsm.wants_running = True
        self.svc.set(S.STARTING)
        return self.svc


async def until(pred: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(guard: DnsGuard) -> AsyncIterator[None]:
    task = asyncio.create_task(guard.run())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def guard_for(svc: Service, events: EventBus, probe: Any, restart: Any = None,
              **kw: Any) -> DnsGuard:
    async def no_restart() -> None:
        raise AssertionError("no restart expected")

    return DnsGuard(Services(svc), events, probe, restart or no_restart,  # type: ignore[arg-type]
                    **kw)


async def test_a_server_the_supervisor_gave_up_on_comes_back_with_capped_backoff() -> None:
    events = EventBus()
    svc = Service(events, S.FATAL)
    fixed = False

    async def probe(timeout: float) -> HealthResult:
        if not fixed:  # it starts, does not answer, and the supervisor gives up again
            svc.fsm.wants_running = False
            svc.set(S.FATAL)
        return health(fixed)

    guard = guard_for(svc, events, probe, interval=60.0, revive_first=0.001, revive_max=0.004)
    waits: list[float] = []
    pause = guard._pause

    async def recording(seconds: float) -> None:
        if seconds < 0.01:  # the backoff's waits (polls and checks are longer)
            waits.append(seconds)
        await pause(seconds)

    guard._pause = recording  # type: ignore[method-assign]
    async with running(guard):
        await until(lambda: svc.starts >= 6, "six revival attempts")
        assert waits[:5] == [0.001, 0.002, 0.004, 0.004, 0.004]  # doubling, capped
        down = guard.degraded
        assert down is not None and down.startswith("DNS server down for ")
        assert "the supervisor gave up (exited too quickly (exited 2))" in down
        assert "`codetainer restart dns`" in down and "codetainer status --tail" in down
        st = guard.status()
        assert st["up"] is False and st["revivals"] >= 6 and st["attempt"] >= 6
        assert [e["event"] for e in events.history].count("network.dns_down") == 1
        fixed = True
        await until(lambda: guard.degraded is None, "the server answering again")
        st = guard.status()
        assert st["up"] is True and st["attempt"] == 0 and st["recoveries"] == 1
        assert st["next_attempt_in_s"] is None
        starts = svc.starts
        await asyncio.sleep(0.05)
        assert svc.starts == starts  # it answers: no more starts


async def test_a_running_server_is_restarted_after_three_silent_checks_in_a_row() -> None:
    events = EventBus()
    svc = Service(events, S.RUNNING)
    answers = iter([False, False, True, False, False, False, True])
    restarts: list[int] = []
    seen: list[str | None] = []

    async def probe(timeout: float) -> HealthResult:
        try:
            ok = next(answers)
        except StopIteration:
            raise asyncio.CancelledError from None
        return health(ok)

    async def restart() -> None:
        restarts.append(1)

    guard = guard_for(svc, events, probe, restart, interval=0.0)
    pause = guard._pause

    async def noting(seconds: float) -> None:
        seen.append(guard.reason)
        await pause(seconds)

    guard._pause = noting  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await guard.run()
    assert restarts == [1]  # two failures, an answer (reset), then three in a row
    assert seen[0] is not None and "1 of 3 checks before a restart" in seen[0]
    assert seen[2] is None  # it answered: healthy again
    assert guard.recoveries == 2 and guard.revivals == 0  # the answer, then after the restart


async def test_an_operators_stop_is_respected_and_said() -> None:
    events = EventBus()
    svc = Service(events, S.STOPPED)

    async def probe(timeout: float) -> HealthResult:
        raise AssertionError("a stopped server is not probed")

    guard = guard_for(svc, events, probe, interval=0.01)
    async with running(guard):
        await until(lambda: guard.reason is not None, "down")
        await asyncio.sleep(0.05)
        assert svc.starts == 0
        assert guard.reason == "stopped on request: `codetainer start dns` starts it again"


async def test_a_restart_by_the_supervisor_is_seen_at_once_and_polled_until_it_answers() -> None:
    events = EventBus()
    svc = Service(events, S.RUNNING)
    polls: list[float] = []

    async def probe(timeout: float) -> HealthResult:
        polls.append(timeout)
        return health(svc.state is S.RUNNING or len(polls) > 4)

    guard = guard_for(svc, events, probe, interval=60.0)
    async with running(guard):
        await until(lambda: len(polls) == 1, "the first check")
        svc.set(S.STARTING)  # killed: the supervisor restarts it at once
        await until(lambda: guard.recoveries == 1, "answering again", timeout=2.0)
        assert polls[0] == 2.0 and all(t < 1.0 for t in polls[1:5])  # quick polls meanwhile
        assert guard.degraded is None and guard.revivals == 0


async def test_a_services_file_without_dns_is_said_not_crashed_on() -> None:
    from codetainer.services.manager import UnknownService

    events = EventBus()
    svc = Service(events, S.FATAL)
    services = Services(svc)

    calls: list[str] = []

    def gone(name: str) -> Service:  # there at first (FATAL), gone during the revival
        calls.append(name)
        if len(calls) == 1:
            return svc
        raise UnknownService(name, ["web"])

    services.get = gone  # type: ignore[method-assign]

    async def probe(timeout: float) -> HealthResult:
        raise AssertionError("nothing to probe")

    guard = DnsGuard(services, events, probe, probe, interval=0.01)  # type: ignore[arg-type]
    async with running(guard):
        await until(lambda: guard.reason is not None, "down")
        assert guard.reason is not None and "no service named 'dns'" in guard.reason
        assert "add [program:dns] back" in guard.reason


async def test_an_answer_seen_meanwhile_beats_a_probe_that_failed() -> None:
    """A reload's own queries found the restarted server answering while the guard's
    probe, sent a moment earlier, timed out: the server is up, not down."""
    events = EventBus()
    svc = Service(events, S.STARTING)
    calls: list[float] = []
    guard: DnsGuard | None = None

    async def probe(timeout: float) -> HealthResult:
        calls.append(timeout)
        if len(calls) > 2:
            raise asyncio.CancelledError
        assert guard is not None
        guard.observe(health(True))  # the reload's check, while this probe was in flight
        return health(False)

    guard = guard_for(svc, events, probe, interval=0.0)
    guard._down("codetainerd is restarting it")
    with pytest.raises(asyncio.CancelledError):
        await guard.run()
    assert guard.reason is None and guard.failures == 0 and len(calls) == 3
