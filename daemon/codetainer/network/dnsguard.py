"""The DNS server never stays down.

The supervisor restarts a server that dies (``autorestart``; BACKOFF with a delay that
grows by a second per quick exit) until it gives up: FATAL after ``startretries``. The
guard takes over from there, and watches what the supervisor cannot see:

* FATAL, or EXITED with no restart coming: the guard starts it again, forever, with a
  capped exponential backoff between attempts (tenacity: 1 s doubling up to 30 s). Each
  attempt is a fresh supervisor start, with its own ``startretries``;
* RUNNING but silent (hung: alive to the supervisor, deaf to clients): real queries every
  ``CODETAINER_DNS_HEALTH_INTERVAL`` seconds, and a restart through the supervisor after
  three failed checks in a row. An upstream outage is not silence: the server still
  answers NXDOMAIN for the probe;
* while the server does not answer, the network is DEGRADED with the reason and what to
  do (``status`` shows it, the overall state too), and healthy again at the first answer.

A stop the operator asked for (``codetainer stop dns``) is respected: DEGRADED, not revived.
The guard wakes on the service's state changes (the event bus), so a restart is noticed
at once and a STARTING server is polled until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_result

from codetainer.backoff import exponential
from codetainer.boot.engine import StepError
from codetainer.services.manager import UnknownService
from codetainer.services.states import ProcessState

if TYPE_CHECKING:
    from codetainer.events import EventBus, Subscription
    from codetainer.network.dnscheck import HealthResult
    from codetainer.services.manager import ServiceManager
    from codetainer.services.process import Service
    from codetainer.status import DnsGuardStatus

log = structlog.get_logger("codetainer.network")

#: failed health checks in a row of a RUNNING server before it is restarted
HEALTH_FAILURES = 3
#: the guard's revival backoff: first wait, cap (seconds)
REVIVE_FIRST_S = 1.0
REVIVE_MAX_S = 30.0
#: how often a STARTING server is asked whether it answers yet, and how long one try waits
STARTING_POLL_S = 0.05
STARTING_PROBE_S = 0.1
SEE = "its output: `codetainer status --tail`; `codetainer restart dns` tries again at once"

Probe = Callable[[float], Awaitable["HealthResult"]]


class DnsGuard:
    def __init__(self, services: ServiceManager, events: EventBus, probe: Probe,
                 restart: Callable[[], Awaitable[None]], *, interval: float = 15.0,
                 name: str = "dns", revive_first: float = REVIVE_FIRST_S,
                 revive_max: float = REVIVE_MAX_S) -> None:
        """``probe(timeout)``: real queries to the server; ``restart()``: stop and start
        it through the supervisor (a hung server)."""
        self.services = services
        self.events = events
        self.probe = probe
        self.restart = restart
        self.interval = interval
        self.name = name
        self.revive_first = revive_first
        self.revive_max = revive_max
        #: why the server is down (None: it answers)
        self.reason: str | None = None
        self.down_since: float | None = None  # wall clock
        self.failures = 0  # failed checks in a row of a RUNNING server
        self.revivals = 0  # starts the guard made, in all
        self.streak = 0  # starts since the server last answered
        self.recoveries = 0  # times it answered again after being down
        self.next_attempt: float | None = None  # monotonic
        #: the daemon is restarting it on purpose (a new config, a hung server)
        self.restarting = False
        #: what the current revival attempt is, while one runs
        self.reviving: str | None = None
        self._answered = 0  # answers seen, so a probe that failed meanwhile is not the last word
        self._sub: Subscription | None = None

    # -- what status shows ---------------------------------------------------------------

    @property
    def degraded(self) -> str | None:
        if self.reason is None or self.down_since is None:
            return None
        return f"DNS server down for {time.time() - self.down_since:.0f}s: {self.reason}"

    def status(self) -> DnsGuardStatus:
        left = None if self.next_attempt is None else max(0.0, self.next_attempt - time.monotonic())
        return {"up": self.reason is None, "reason": self.reason, "down_since": self.down_since,
                "revivals": self.revivals, "attempt": self.streak, "recoveries": self.recoveries,
                "next_attempt_in_s": None if left is None else round(left, 1)}

    def _down(self, reason: str) -> None:
        if self.reason is None:
            self.down_since = time.time()
            log.warning("dns_down", reason=reason)
            self.events.publish("network.dns_down", reason=reason)
        self.reason = reason

    @contextlib.contextmanager
    def planned(self) -> Iterator[None]:
        """The daemon restarts it on purpose meanwhile (a new config, a hung server)."""
        self.restarting = True
        try:
            yield
        finally:
            self.restarting = False

    def observe(self, health: HealthResult) -> None:
        """Any real query that got an answer (the boot's, a reload's) proves it is up."""
        if health.nxdomain:
            self._up()

    def _up(self) -> None:
        self._answered += 1
        self.failures = 0
        self.streak = 0
        self.next_attempt = None
        if self.reason is not None:
            self.recoveries += 1
            down_s = round(time.time() - (self.down_since or time.time()), 3)
            log.info("dns_recovered", previous=self.reason, down_s=down_s, revivals=self.revivals)
            self.events.publish("network.dns_recovered", down_s=down_s)
        self.reason = None
        self.down_since = None

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        self._sub = self.events.subscribe(maxsize=256)
        try:
            while True:
                await self._tick()
        finally:
            self._sub.close()

    async def _tick(self) -> None:
        try:
            await self._step()
        except UnknownService as exc:  # a reload of the services file took it away
            self._down(f"{exc.message}: add [program:dns] back to the services file and reload")
            await self._pause(self.interval)

    async def _step(self) -> None:
        svc = self._service()
        state = svc.state
        if state is ProcessState.RUNNING:
            await self._check_running()
        elif state is ProcessState.STARTING:  # answering: RUNNING (an event) comes next
            await self._pause(self.interval if await self._answers(svc) else STARTING_POLL_S)
        elif _gave_up(svc):
            await self._revive()
        else:  # BACKOFF (the supervisor retries), STOPPING, STOPPED
            self._down(self._why(svc))
            await self._pause(self.interval)

    async def _check_running(self) -> None:
        before = self._answered
        health = await self.probe(2.0)
        if health.nxdomain or self._answered != before:  # it answers (an upstream outage
            # is not its silence), or another query got an answer while this one failed
            self._up()
            await self._pause(self.interval)
            return
        self.failures += 1
        log.warning("dns_health_failed", reason=health.reason, failures=self.failures)
        self._down(f"it does not answer ({health.reason}; {self.failures} of {HEALTH_FAILURES} "
                   f"checks before a restart); {SEE}")
        if self.failures >= HEALTH_FAILURES:
            self.failures = 0
            log.error("dns_restart", reason=health.reason)
            with contextlib.suppress(StepError):  # not answering after it: carry on watching
                await self.restart()
            return
        await self._pause(self.interval)

    async def _answers(self, svc: Service) -> bool:
        """One quick probe of a STARTING server; marks it up or down."""
        last = svc.fsm.last_exit
        starting = self.reviving or ("codetainerd is restarting it" if self.restarting else
                                     "it is starting and does not answer yet"
                                     + (f" (last: {last})" if last else ""))
        if self.reason is not None:
            self.reason = starting  # not what it was before this start, while the probe runs
        before = self._answered
        health = await self.probe(STARTING_PROBE_S)
        if health.nxdomain or self._answered != before:  # (see _check_running)
            self._up()
            return True
        self._down(starting)
        return False

    async def _revive(self) -> None:
        """Start it again until it answers; capped exponential backoff between attempts."""
        retrying = AsyncRetrying(
            wait=exponential(self.revive_first, self.revive_max),
            retry=retry_if_result(lambda done: not done),
            sleep=self._pause, before_sleep=self._before_sleep,
        )
        try:
            await retrying(self._attempt)
        finally:
            self.next_attempt = None
            self.reviving = None

    def _before_sleep(self, state: RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0.0
        self.next_attempt = time.monotonic() + wait
        self._down(f"the supervisor gave up ({self._last()}); codetainerd brings it back: attempt "
                   f"{self.streak + 1} in {wait:.0f}s (backoff up to {self.revive_max:.0f}s); {SEE}")

    def _last(self) -> str:
        with contextlib.suppress(UnknownService):
            fsm = self.services.get(self.name).fsm
            return fsm.spawnerr or fsm.last_exit or "no exit recorded"
        return "the service is gone"

    async def _attempt(self) -> bool:
        """One start: True once it answers (or no longer needs us), False when the
        supervisor gives up on it again."""
        self.next_attempt = None
        svc = self._service()
        if _gave_up(svc):
            self.revivals += 1
            self.streak += 1
            log.warning("dns_revive", attempt=self.streak, revivals=self.revivals,
                        after=svc.fsm.spawnerr or svc.fsm.last_exit)
            self.reviving = (f"the supervisor gave up ({self._last()}); codetainerd is starting "
                             f"it again (attempt {self.streak}); {SEE}")
            self._down(self.reviving)
            self.services.start(self.name)
        while True:
            svc = self._service()
            state = svc.state
            if _gave_up(svc):
                return False
            if state is ProcessState.STOPPED:  # the operator stopped it meanwhile
                return True
            if state in (ProcessState.STARTING, ProcessState.RUNNING):
                if await self._answers(svc):
                    return True
                await self._pause(STARTING_POLL_S)
            else:  # BACKOFF: the supervisor's own retries within this attempt
                self._down(self._why(svc))
                await self._pause(self.interval)

    def _why(self, svc: Service) -> str:
        fsm = svc.fsm
        if svc.state is ProcessState.BACKOFF:
            left = max(0.0, fsm.delay - time.monotonic())
            retry = (f"the supervisor retries in {left:.0f}s (attempt {fsm.backoff} of "
                     f"{svc.config.startretries})")
            if self.reviving:
                return f"{self.reviving}; it exits at once ({fsm.spawnerr}), {retry}"
            return f"it keeps exiting ({fsm.spawnerr}); {retry}, then codetainerd takes over; {SEE}"
        if self.restarting:
            return f"codetainerd is restarting it ({svc.state.name})"
        if svc.state is ProcessState.STOPPED and not fsm.wants_running:
            return "stopped on request: `codetainer start dns` starts it again"
        return f"it is {svc.state.name}"

    # -- waiting -----------------------------------------------------------------------------

    def _service(self) -> Service:
        """The service as it is now; state changes queued until now are thereby seen."""
        sub = self._sub
        while sub is not None and not sub.queue.empty():
            if sub.queue.get_nowait() is None:  # overflowed: a fresh subscription
                self._resubscribe()
                sub = self._sub
        return self.services.get(self.name)

    def _resubscribe(self) -> None:
        if self._sub is not None:
            self._sub.close()
        self._sub = self.events.subscribe(maxsize=256)

    async def _pause(self, seconds: float) -> None:
        """Until the service changes state or ``seconds`` pass."""
        if self._sub is None:
            await asyncio.sleep(seconds)
            return
        try:
            async with asyncio.timeout(seconds):
                while True:
                    event = await self._sub.queue.get()
                    if event is None:
                        self._resubscribe()
                        return
                    if event.get("event") == "service.state" and event.get("service") == self.name:
                        return
        except TimeoutError:
            pass


def _gave_up(svc: Service) -> bool:
    """Down with no restart coming from the supervisor (not an operator's stop)."""
    if svc.state is ProcessState.FATAL:
        return True
    return svc.state is ProcessState.EXITED and not svc.fsm.wants_running
