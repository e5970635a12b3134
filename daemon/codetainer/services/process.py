"""The asyncio driver of one supervised service.

It owns the service's child: spawns it (own process group, clean signal state, closed
fds, dropped to ``user=``), waits for *that pid only* through a pidfd (never
``waitpid(-1)``, which would steal other children's statuses), turns its output into
rate-limited log events, keeps the last lines for ``status``, and feeds the state
machine in ``fsm.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from codetainer.events import EventBus
from codetainer.limits import SERVICE_OOM_SCORE_ADJ, set_oom_score_adj
from codetainer.runner import reap
from codetainer.services.config import ServiceConfig, user_identity
from codetainer.services.fsm import Action, Kill, ServiceFSM, Spawn
from codetainer.services.states import ProcessState, signame

if TYPE_CHECKING:
    from codetainer.status import ServiceStatus

log = structlog.get_logger("codetainer.services")

TAIL_LINES = 50
MAX_LINE = 4096
#: lines dropped by the rate limit are counted in one ``service_output_dropped`` event
#: at most this often (the first drop arms it), so a flood costs one line a second
DROP_REPORT_S = 1.0


def inherited_env(base: Mapping[str, str] | None) -> dict[str, str]:
    """What a service inherits: ``base`` (default: the daemon's environment now), never a
    secret by name; a program that needs one says so with ``environment=``."""
    from codetainer.init.environ import SECRET_NAMES

    env = dict(os.environ if base is None else base)
    for name in SECRET_NAMES:
        env.pop(name, None)
    return env


class RateLimit:
    """Token bucket: ``rate`` lines a second, bursts up to ``burst``."""

    def __init__(self, rate: float = 100.0, burst: float = 200.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst = rate, burst
        self.clock = clock
        self.tokens = burst
        self.stamp = clock()
        self.dropped = 0  # in all
        self.unreported = 0  # since the last take_unreported()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        self.unreported += 1
        return False

    def take_unreported(self) -> int:
        n, self.unreported = self.unreported, 0
        return n


class _LineProtocol(asyncio.Protocol):
    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.buf = b""
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.on_line(line[:MAX_LINE].decode(errors="replace"))
        if len(self.buf) > MAX_LINE:
            self.on_line(self.buf[:MAX_LINE].decode(errors="replace"))
            self.buf = b""

    def eof_received(self) -> bool | None:
        if self.buf:
            self.on_line(self.buf[:MAX_LINE].decode(errors="replace"))
            self.buf = b""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Service:
    def __init__(self, config: ServiceConfig, events: EventBus,
                 base_env: dict[str, str] | None = None) -> None:
        self.config = config
        self.fsm = ServiceFSM(config)
        self.events = events
        #: None: the daemon's environment as it is at each spawn (after the secrets step
        #: took the secrets out), never a snapshot from before it
        self.base_env = base_env
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.limit = RateLimit()
        self._drop_report: asyncio.TimerHandle | None = None
        self.started_at = 0.0  # wall clock of last spawn, for uptime
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._wake = asyncio.Event()
        #: wait_state's callers: the states each waits for, and its future
        self._waiters: list[tuple[frozenset[ProcessState], asyncio.Future[None]]] = []
        self.fsm.on_change = self._state_changed
        self._task: asyncio.Task[None] | None = None
        self._pipes: list[asyncio.BaseTransport] = []
        #: called with (stream, line) for every output line, before rate limiting
        self.output_listeners: list[Callable[[str, str], None]] = []

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> ProcessState:
        return self.fsm.state

    # -- lifecycle -----------------------------------------------------------------
    def run(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"service:{self.name}")

    async def close(self) -> None:
        if self._drop_report is not None:
            self._drop_report.cancel()
            self._report_dropped()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def start(self) -> None:
        self._drive(self.fsm.request_start)

    def stop(self) -> None:
        self._drive(self.fsm.request_stop)

    async def wait_state(self, states: set[ProcessState], timeout: float) -> bool:
        """Wait until the service enters one of ``states`` (True) or ``timeout`` passes
        (False, unless it is in one of them by then). Woken by the FSM's state change,
        never by polling; a state passed through within one step counts too."""
        if self.state in states:
            return True
        waiter = (frozenset(states), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):  # not wait_for: see _loop
                await waiter[1]
        except TimeoutError:
            return self.state in states
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return True

    def _state_changed(self, old: ProcessState, new: ProcessState) -> None:
        """The FSM's change_state hook: wake whoever waits for ``new``."""
        for states, fut in self._waiters:
            if new in states and not fut.done():
                fut.set_result(None)

    async def stop_and_wait(self, timeout: float | None = None) -> None:
        """Stop; the FSM escalates to SIGKILL at stopwaitsecs. Then kill stragglers."""
        pgid = self.fsm.pid
        self.stop()
        limit = (timeout if timeout is not None else self.config.stopwaitsecs) + 5.0
        await self.wait_state({ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL},
                              limit)
        if pgid:
            # Anything left in the service's process group dies with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def signal(self, sig: int) -> None:
        if self.fsm.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.fsm.pid, sig)

    # -- driver loop ------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            deadline = self.fsm.next_deadline()
            self._wake.clear()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel
            # (close()) that lands as the wake-up does, and the loop would run on forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._drive(self.fsm.tick)

    def _drive(self, step: Callable[[float], list[Action]]) -> None:
        """Feed one input to the FSM, carry out its actions, publish what changed."""
        before = self.fsm.state
        self._act(step(time.monotonic()))
        self._note(before)

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn()
            elif isinstance(action, Kill):
                self._kill(action)
        self._wake.set()

    def _note(self, before: ProcessState) -> None:
        # Publish the transitions; the FSM may pass through several states in one step.
        after = self.fsm.state
        if after is before:
            return
        fields: dict[str, Any] = {"service": self.name, "old": before.name, "state": after.name,
                                  "pid": self.fsm.pid}
        if after is ProcessState.RUNNING:
            log.info("service_running", service=self.name, pid=self.fsm.pid)
        elif after is ProcessState.FATAL:
            log.error("service_gave_up", service=self.name, reason=self.fsm.spawnerr,
                      attempts=self.fsm.starts)
        elif after is ProcessState.BACKOFF:
            log.warning("service_backoff", service=self.name, reason=self.fsm.spawnerr,
                        retry_in_s=round(self.fsm.delay - time.monotonic(), 2))
        self.events.publish("service.state", **fields)

    def _spawn(self) -> None:
        cfg = self.config
        env = inherited_env(self.base_env)
        uid = gid = None
        groups: list[int] | None = None
        if cfg.uid is not None:
            uid, gid, groups, ident = user_identity(cfg.uid)
            env.update(ident)
        env.update({"SUPERVISOR_ENABLED": "1", "SUPERVISOR_PROCESS_NAME": cfg.name,
                    "SUPERVISOR_GROUP_NAME": cfg.name})
        env.update(cfg.env)
        try:
            proc = subprocess.Popen(
                list(cfg.command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if cfg.redirect_stderr else subprocess.PIPE,
                cwd=cfg.directory,
                env=env,
                close_fds=True,
                process_group=0,
                user=uid,
                group=gid,
                extra_groups=groups,
                umask=cfg.umask if cfg.umask is not None else -1,
                restore_signals=True,
            )
        except OSError as exc:
            reason = f"cannot start {cfg.command[0]}: {exc.strerror or exc}"
            log.warning("service_spawn_error", service=cfg.name, reason=reason)
            self.fsm.spawn_failed(time.monotonic(), reason)
            return
        # After the daemon's -999 (inherited), a service is spared by the OOM killer only
        # after every agent process (codetainer.limits); it may have exited already.
        set_oom_score_adj(SERVICE_OOM_SCORE_ADJ, proc.pid)
        self._proc = proc
        self.fsm.spawned(proc.pid)
        self.started_at = time.time()
        log.info("service_spawned", service=cfg.name, pid=proc.pid)
        loop = asyncio.get_running_loop()
        self._pidfd = os.pidfd_open(proc.pid)
        loop.add_reader(self._pidfd, self._on_exit, proc, self._pidfd)
        for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if pipe is not None:
                self._attach_pipe(stream, pipe)

    def _attach_pipe(self, stream: str, pipe: Any) -> None:
        def on_line(line: str) -> None:
            self.tail.append(line)
            for listener in self.output_listeners:
                try:
                    listener(stream, line)
                except Exception:
                    log.exception("service_output_listener_failed", service=self.name)
            if self.limit.allow():
                log.info("service_output", service=self.name, stream=stream, line=line)
            elif self._drop_report is None:
                self._drop_report = asyncio.get_running_loop().call_later(
                    DROP_REPORT_S, self._report_dropped)

        async def connect() -> None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.connect_read_pipe(lambda: _LineProtocol(on_line), pipe)
            self._pipes.append(transport)

        asyncio.get_running_loop().create_task(connect())

    def _report_dropped(self) -> None:
        """Say how many output lines the rate limit dropped since the last report."""
        self._drop_report = None
        dropped = self.limit.take_unreported()
        if dropped:
            log.warning("service_output_dropped", service=self.name, dropped=dropped,
                        total=self.limit.dropped, rate=self.limit.rate, burst=self.limit.burst)

    def _on_exit(self, proc: subprocess.Popen[bytes], pidfd: int) -> None:
        # The only place an exit is recorded: waitpid on our own pid, never -1.
        status = reap(proc)
        if status is None:
            return
        pid = proc.pid
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        self._pidfd = -1
        self._proc = None
        self._pipes = [t for t in self._pipes if not t.is_closing()]
        before = self.fsm.state
        actions = self.fsm.exited(time.monotonic(), status)
        msg = self.fsm.last_exit
        if before is ProcessState.STOPPING:
            log.info("service_stopped", service=self.name, pid=pid, exit=msg)
        else:
            log.warning("service_exited", service=self.name, pid=pid, exit=msg,
                        expected=self.fsm.expected)
        self.events.publish("service.exit", service=self.name, pid=pid, exit=msg)
        self._act(actions)
        self._note(before)

    def _kill(self, action: Kill) -> None:
        pid = self.fsm.pid
        if not pid:
            return
        log.info("service_signal", service=self.name, pid=pid, signal=signame(action.sig),
                 group=action.group)
        with contextlib.suppress(ProcessLookupError):
            if action.group:
                os.killpg(pid, action.sig)
            else:
                os.kill(pid, action.sig)

    def snapshot(self) -> ServiceStatus:
        fsm = self.fsm
        up = fsm.state is ProcessState.RUNNING and self.started_at
        return {
            "name": self.name,
            "state": fsm.state.name,
            "pid": fsm.pid or None,
            "uptime_s": round(time.time() - self.started_at, 1) if up else None,
            "restarts": max(0, fsm.starts - 1),
            "last_exit": fsm.last_exit or None,
            "spawnerr": fsm.spawnerr or None,
            "priority": self.config.priority,
            "tail": list(self.tail),
        }
