"""The boot engine: an ordered list of named steps, each with a timeout and a policy.

Overall state machine (the table is also in README.md and tests/unit/test_boot_engine.py)::

    BOOTING  -> READY | DEGRADED | FAILED
    READY | DEGRADED | FAILED -> STOPPING
    BOOTING -> STOPPING            (shutdown requested while booting)
    STOPPING -> STOPPED

A step's ``run`` coroutine returns a one-line summary or raises :class:`StepError`
(``reason`` and, where known, ``hint``: what the operator should do). A ``fatal`` step
that fails makes boot FAILED and skips every later step; a ``degraded`` step that fails
makes the final state DEGRADED and later steps that ``require`` it are skipped.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from codetainer.events import EventBus
from codetainer.lifecycle import (
    InvalidTransition,  # noqa: F401 - raised by change_state; callers import it here
    transition,
)

if TYPE_CHECKING:
    from codetainer.boot.privileges import AgentUser
    from codetainer.settings import Settings
    from codetainer.status import StepStatus

log = structlog.get_logger("codetainer.boot")


class BootState(enum.Enum):
    BOOTING = "BOOTING"
    READY = "READY"
    DEGRADED = "DEGRADED"
    FAILED = "FAILED"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


BOOT_TRANSITIONS: dict[BootState, frozenset[BootState]] = {
    BootState.BOOTING: frozenset(
        {BootState.READY, BootState.DEGRADED, BootState.FAILED, BootState.STOPPING}
    ),
    BootState.READY: frozenset({BootState.STOPPING}),
    BootState.DEGRADED: frozenset({BootState.STOPPING}),
    BootState.FAILED: frozenset({BootState.STOPPING}),
    BootState.STOPPING: frozenset({BootState.STOPPED}),
    BootState.STOPPED: frozenset(),
}


class Policy(enum.Enum):
    FATAL = "fatal"
    DEGRADED = "degraded"


class StepState(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    OK = "OK"
    FAILED = "FAILED"  # failed; with policy fatal this failed the boot
    DEGRADED = "DEGRADED"  # failed under policy degraded
    SKIPPED = "SKIPPED"


class StepError(Exception):
    """A step failed. ``reason`` is one line; ``hint`` says what to do next."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


# -- what the steps use of the parts the daemon wires in ----------------------------------
# Narrow on purpose: the boot layer never imports the daemon or the service manager; these
# say exactly what a step may use of them (ServiceManager and Daemon satisfy them).


class ServiceConfigView(Protocol):
    @property
    def startsecs(self) -> float: ...


class ServiceFSMView(Protocol):
    @property
    def spawnerr(self) -> str: ...


class ServiceView(Protocol):
    """One supervised service, as the ``services`` step reports it."""

    @property
    def config(self) -> ServiceConfigView: ...
    @property
    def state(self) -> enum.Enum: ...
    @property
    def fsm(self) -> ServiceFSMView: ...


class BootServices(Protocol):
    """The service manager, as the ``services`` step (start the autostart services, wait
    for them) and the readiness check (which are not RUNNING) use it."""

    def start_autostart(self, exclude: set[str] | None = None) -> list[str]: ...
    async def wait_running(self, names: list[str], timeout: float) -> list[str]: ...
    def not_running(self) -> list[str]: ...
    def get(self, name: str) -> ServiceView: ...


class BootDaemon(Protocol):
    """The daemon running the boot: a readiness check asks its engine which steps this
    boot has (``--steps`` may leave the network out)."""

    @property
    def engine(self) -> BootEngine: ...


#: a part's teardown, awaited at shutdown
Teardown = Callable[[], Awaitable[object]]


@dataclass
class BootContext:
    """What steps share. Each field below ``daemon`` is handed from one step to later
    ones (or to the daemon's shutdown); its comment names who writes and who reads it."""

    settings: Settings
    events: EventBus
    #: secrets -> credentials, proxy, plugins, the session: the secret values, read once
    #: from the environment (init/environ.py names them)
    secrets: dict[str, str] = field(default_factory=dict)
    #: filled by the daemon (None in tests that run steps alone)
    services: BootServices | None = None
    daemon: BootDaemon | None = None
    #: filesystem -> credentials, agent-settings, repository: the agent's account, looked
    #: up once; read it through :meth:`agent` (which looks it up when no step did)
    agent_user: AgentUser | None = None
    #: agent-settings -> readiness: the directories the agent's settings trust (None: the
    #: step did not run; readiness then expects the workspace)
    trusted_dirs: list[str] | None = None
    #: network-dns, proxy -> services: services their own step started and waits for;
    #: the ``services`` step leaves them alone
    started_by_steps: list[str] = field(default_factory=list)
    #: limits, proxy -> the daemon's shutdown: name -> teardown, awaited in reverse order
    #: of registration (after the agent session and the network, before the services)
    teardowns: dict[str, Teardown] = field(default_factory=dict)

    def agent(self) -> AgentUser:
        """The agent's account: the filesystem step's, else looked up now (LookupError
        names the user when it does not exist)."""
        if self.agent_user is None:
            from codetainer.boot.privileges import AgentUser

            self.agent_user = AgentUser.lookup(self.settings.agent_user, self.settings.home)
        return self.agent_user


StepFn = Callable[[BootContext], Awaitable[str | None]]


@dataclass
class Step:
    name: str
    run: StepFn
    timeout: float
    policy: Policy = Policy.FATAL
    requires: tuple[str, ...] = ()
    description: str = ""


@dataclass
class StepRecord:
    name: str
    policy: Policy
    description: str
    state: StepState = StepState.PENDING
    started_at: float | None = None  # wall clock, for display
    duration_s: float | None = None
    reason: str = ""
    hint: str | None = None

    def as_dict(self) -> StepStatus:
        return {
            "name": self.name,
            "policy": self.policy.value,
            "state": self.state.value,
            "started_at": self.started_at,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 4),
            "reason": self.reason,
            "hint": self.hint,
            "description": self.description,
        }


class BootEngine:
    def __init__(self, steps: Sequence[Step], ctx: BootContext) -> None:
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate boot step names in {names}")
        self.steps = list(steps)
        self.ctx = ctx
        self.records = {
            s.name: StepRecord(s.name, s.policy, s.description or s.name) for s in steps
        }
        self.state = BootState.BOOTING
        self.started = time.monotonic()
        self.finished: float | None = None
        self.done = asyncio.Event()

    def change_state(self, new: BootState) -> None:
        old = self.state
        self.state = transition(BOOT_TRANSITIONS, old, new, "boot state")
        log.info("boot_state", old=old.value, new=new.value)
        self.ctx.events.publish("boot.state", old=old.value, state=new.value)

    def _emit(self, rec: StepRecord) -> None:
        self.ctx.events.publish("boot.step", **rec.as_dict())

    async def run(self) -> BootState:
        failed_fatal = False
        degraded = False
        ok: set[str] = set()
        for step in self.steps:
            rec = self.records[step.name]
            if self.state is not BootState.BOOTING:
                break  # shutdown requested
            missing = [r for r in step.requires if r not in ok and r in self.records]
            if failed_fatal or missing:
                rec.state = StepState.SKIPPED
                rec.reason = (
                    "skipped: an earlier fatal step failed"
                    if failed_fatal
                    else f"skipped: needs {', '.join(missing)}"
                )
                self._emit(rec)
                continue
            rec.state = StepState.RUNNING
            rec.started_at = time.time()
            t0 = time.monotonic()
            self._emit(rec)
            log.info("boot_step_start", step=step.name)
            try:
                summary = await asyncio.wait_for(step.run(self.ctx), step.timeout)
            except StepError as exc:
                rec.reason, rec.hint = exc.reason, exc.hint
                rec.state = StepState.FAILED if step.policy is Policy.FATAL else StepState.DEGRADED
            except TimeoutError:
                rec.reason = f"timed out after {step.timeout:g}s"
                rec.state = StepState.FAILED if step.policy is Policy.FATAL else StepState.DEGRADED
            except asyncio.CancelledError:
                rec.duration_s = time.monotonic() - t0
                rec.state = StepState.FAILED
                rec.reason = "cancelled (shutdown)"
                self._emit(rec)
                raise
            except Exception as exc:  # a bug in a step must not kill the daemon
                rec.reason = f"internal error: {type(exc).__name__}: {exc}"
                rec.state = StepState.FAILED if step.policy is Policy.FATAL else StepState.DEGRADED
                log.exception("boot_step_crash", step=step.name)
            else:
                rec.state = StepState.OK
                rec.reason = summary or ""
                ok.add(step.name)
            rec.duration_s = time.monotonic() - t0
            if rec.state is StepState.FAILED:
                failed_fatal = True
                log.error("boot_step_failed", step=step.name, reason=rec.reason, hint=rec.hint)
            elif rec.state is StepState.DEGRADED:
                degraded = True
                log.warning("boot_step_degraded", step=step.name, reason=rec.reason, hint=rec.hint)
            else:
                log.info("boot_step_ok", step=step.name, duration_s=round(rec.duration_s, 4),
                         reason=rec.reason)
            self._emit(rec)
        self.finished = time.monotonic()
        if self.state is BootState.BOOTING:
            if failed_fatal:
                self.change_state(BootState.FAILED)
            elif degraded:
                self.change_state(BootState.DEGRADED)
            else:
                self.change_state(BootState.READY)
        self.done.set()
        return self.state

    def reasons(self) -> list[str]:
        """One line per step that did not succeed, for status and attach."""
        return [
            f"{r.name}: {r.reason}" + (f" ({r.hint})" if r.hint else "")
            for r in self.records.values()
            if r.state in (StepState.FAILED, StepState.DEGRADED)
        ]

    def snapshot(self) -> list[StepStatus]:
        return [r.as_dict() for r in self.records.values()]
