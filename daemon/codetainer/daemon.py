"""The asyncio daemon: ``startup -> main_loop -> shutdown``.

Signal handlers only enqueue; the main task acts and logs:

* SIGTERM, SIGINT: orderly shutdown; a second one while stopping: forced (exit 130)
* SIGQUIT: forced shutdown at once
* SIGHUP: reload the services file (and the network policy when it is active)
* SIGUSR1: log a status snapshot
* SIGUSR2: toggle debug logging (and back to ``CODETAINER_LOG_LEVEL``)

The init also forwards SIGWINCH, whose default disposition (ignore) is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from codetainer import __version__
from codetainer.boot import plan
from codetainer.boot.engine import BootContext, BootEngine, BootState, Step
from codetainer.control import protocol
from codetainer.control.server import ControlServer, Request, RequestError, Send
from codetainer.errors import DaemonHalt, ExitCode
from codetainer.events import EventBus
from codetainer.heap import HEAP, settle_heap
from codetainer.limits.controller import LimitsController
from codetainer.network.controller import NetworkController
from codetainer.services.config import ServiceConfigError
from codetainer.services.manager import ServiceManager, UnknownService
from codetainer.settings import Settings

if TYPE_CHECKING:
    from codetainer.init.cmdline import Command
    from codetainer.proxy.setup import ProxyController
    from codetainer.status import (
        DaemonInfo,
        DaemonSample,
        HealthReply,
        ServiceStatus,
        StatusReply,
    )

log = structlog.get_logger("codetainer.daemon")


def _rss_bytes(pid: str) -> int:
    """Resident set size of ``/proc/<pid>`` (``statm``'s second field, in pages)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Daemon:
    def __init__(self, settings: Settings, steps: list[Step] | None = None,
                 phases: set[str] | None = None, names: list[str] | None = None, *,
                 settle_heap_after_boot: bool = False) -> None:
        """``steps`` given: exactly those (tests). Otherwise the plan, filtered by ``names``.
        ``settle_heap_after_boot``: the process is the daemon's own (main()), not a test's."""
        self.settings = settings
        self.events = EventBus()
        self.services = ServiceManager(settings.services_file, self.events)
        self.ctx = BootContext(settings=settings, events=self.events, services=self.services,
                               daemon=self)
        self.network = NetworkController(settings, self.events, self.services)
        self.limits = LimitsController(settings, self.events, self.services)
        self.proxy: ProxyController | None = None  # with CODETAINER_PROXY=on
        if settings.proxy:  # proxy.setup's proxy_enabled; its module only when it is on
            from codetainer.proxy.setup import ProxyController

            self.proxy = ProxyController(settings, self.events, self.services, self.network)
        if steps is None:
            steps = plan.select(plan.all_steps(settings, self.network, self.limits, self.proxy),
                                names)
            phases = set(plan.PHASES) if names is None else {n for n in names if n in plan.PHASES}
        phases = phases or set()
        self.engine = BootEngine(steps, self.ctx)
        self.session: Any = None  # SessionManager when the session phase is on
        self.control = ControlServer(settings.socket)
        self.session_task: asyncio.Task[None] | None = None
        if "session" in phases:
            from codetainer.session import attachfile
            from codetainer.session.tmux import SessionManager

            self.session = SessionManager(settings, self.events, self.ctx.secrets,
                                          limits=self.limits.exec_limits,
                                          attach_file=attachfile.path_for(settings.socket))
        self.started = time.time()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.boot_task: asyncio.Task[BootState] | None = None
        self.extra_status: dict[str, Any] = {}  # name -> callable returning a dict
        #: name -> cheap "is this part degraded now" (status --check asks it instead of
        #: building the part's section); a part without one is asked through its section
        self.degraded_probes: dict[str, Callable[[], str | None]] = {}
        #: name -> reload of a part (SIGHUP and `codetainer reload`, after the services)
        self.reloaders: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}
        self._info_cache: tuple[float, DaemonSample] | None = None
        self.settle_heap_after_boot = settle_heap_after_boot

    # -- startup -----------------------------------------------------------------------
    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2):
            loop.add_signal_handler(sig, self.queue.put_nowait, ("signal", sig))
        try:
            self.services.load()
        except ServiceConfigError as exc:
            raise DaemonHalt(str(exc), ExitCode.CONFIG) from None
        try:
            Path(self.settings.run_dir).mkdir(parents=True, exist_ok=True)
            if "readonly-root" in self.engine.records and self.settings.readonly_root:
                # The root goes read-only during boot: give the runtime directory its own
                # tmpfs now, before the socket exists (a later mount would hide it).
                from codetainer.boot.filesystem import ensure_writable_run_dir

                ensure_writable_run_dir(self.settings)
            os.chmod(self.settings.run_dir, 0o755)  # noqa: S103 - the agent's tmux socket dir lives here
        except OSError as exc:
            raise DaemonHalt(f"cannot create runtime directory {self.settings.run_dir} "
                             f"(CODETAINER_RUN_DIR): {exc}", ExitCode.RUNTIME) from None
        try:
            await self.control.start()
        except OSError as exc:
            raise DaemonHalt(f"cannot create control socket {self.settings.socket}: {exc}",
                             ExitCode.RUNTIME) from None
        self._register_ops()
        self.network.register(self.control)
        self.extra_status["network"] = self.network.status
        self.extra_status["limits"] = self.limits.status
        self.degraded_probes["network"] = self.network.degraded
        self.degraded_probes["limits"] = self.limits.degraded
        if self.proxy is not None:
            self.extra_status["proxy"] = self.proxy.status
            self.degraded_probes["proxy"] = self.proxy.degraded
        self.reloaders["network"] = self.network.reload
        from codetainer.init import dumpable

        log.info("daemon_started", version=__version__, pid=os.getpid(), ppid=os.getppid(),
                 steps=[s.name for s in self.engine.steps], socket=self.settings.socket,
                 dumpable=dumpable())  # codetainerd makes it False (init/pid1.py)

    def _register_ops(self) -> None:
        c = self.control
        c.register("status", self.op_status)
        c.register("ping", self.op_ping)
        c.register_stream("events", self.op_events)
        c.register_stream("wait", self.op_wait)
        c.register("start", self.op_start, privileged=True)
        c.register("stop", self.op_stop, privileged=True)
        c.register("restart", self.op_restart, privileged=True)
        c.register("reload", self.op_reload, privileged=True)
        c.register("shutdown", self.op_shutdown, privileged=True)
        if self.session is not None:
            c.register("session", self.session.session_handler)

    # -- main loop ---------------------------------------------------------------------
    async def boot(self) -> BootState:
        try:
            state = await self.engine.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in the engine itself: the daemon stays up and says so.
            log.exception("boot_crashed")
            if self.engine.state is BootState.BOOTING:
                self.engine.change_state(BootState.FAILED)
            self.engine.done.set()
            return self.engine.state
        if state in (BootState.READY, BootState.DEGRADED) and self.session is not None:
            from codetainer.session.tmux import SessionError

            try:
                await self.session.start()  # publishes session.ready / session.failed
            except SessionError as exc:
                log.error("session_start_failed", reason=exc.reason, hint=exc.hint)
            except Exception:
                log.exception("session_start_failed")
                self.events.publish("session.failed", reason="internal error, see logs")
            else:
                self.session_task = asyncio.create_task(self.session.monitor(), name="session")
        if self.settle_heap_after_boot:
            settle_heap()
        return state

    async def main_loop(self) -> int:
        self.boot_task = asyncio.create_task(self.boot(), name="boot")
        while True:
            kind, arg = await self.queue.get()
            if kind == "signal":
                if arg in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal_received", signal=signal.Signals(arg).name)
                    return ExitCode.OK
                if arg == signal.SIGQUIT:
                    return ExitCode.FORCED
                if arg == signal.SIGHUP:
                    await self.reload()
                elif arg == signal.SIGUSR1:
                    log.info("status_snapshot", **self.status(tail=False))
                elif arg == signal.SIGUSR2:
                    from codetainer.log import toggle_debug

                    log.warning("log_level_changed", log_level=toggle_debug(self.settings.log_level))
            elif kind == "shutdown":
                return ExitCode.OK

    async def shutdown(self, code: int) -> int:
        """Agent session, then services in reverse priority; a 2nd signal forces it."""
        if self.engine.state is not BootState.STOPPING:
            self.engine.change_state(BootState.STOPPING)
        log.info("shutdown_begin", forced=code == ExitCode.FORCED)
        if self.boot_task is not None and not self.boot_task.done():
            self.boot_task.cancel()
            with contextlib.suppress(BaseException):
                await self.boot_task
        if code == ExitCode.FORCED:
            await self._force()
            return code
        orderly = asyncio.create_task(self._orderly(), name="shutdown")
        forced = asyncio.create_task(self._second_signal(), name="second-signal")
        deadline = self.settings.shutdown_timeout
        done, _ = await asyncio.wait({orderly, forced}, timeout=deadline,
                                     return_when=asyncio.FIRST_COMPLETED)
        if orderly in done:
            forced.cancel()
            orderly.result()
            self.engine.change_state(BootState.STOPPED)
            log.info("shutdown_complete")
            await self.control.close()
            return code
        orderly.cancel()
        forced.cancel()
        log.warning("shutdown_forced", reason="second signal" if forced in done else "deadline")
        await self._force()
        return ExitCode.FORCED

    async def _second_signal(self) -> None:
        while True:
            kind, arg = await self.queue.get()
            if kind == "signal" and arg in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                return

    async def _orderly(self) -> None:
        errors: list[str] = []
        if self.session is not None:
            try:
                await self.session.stop()
                if self.session_task is not None:
                    await asyncio.wait_for(self.session_task, 5.0)
            except Exception as exc:
                errors.append(f"session: {exc}")
        try:
            await self.network.close()
        except Exception as exc:
            errors.append(f"network: {exc}")
        for name, stop in list(self.ctx.teardowns.items())[::-1]:
            try:
                await stop()
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        await self.services.stop_all()
        for err in errors:
            log.error("shutdown_error", error=err)

    async def _force(self) -> None:
        await self.services.kill_all()
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.stop(), 2.0)
        await self.control.close()

    async def reload(self) -> dict[str, Any]:
        try:
            result: dict[str, Any] = dict(await self.services.reload())
        except ServiceConfigError as exc:
            log.error("reload_failed", error=str(exc))
            raise RequestError(protocol.FAILED, f"reload failed, nothing changed: {exc}") from None
        for name, fn in self.reloaders.items():
            try:
                result[name] = await fn()
            except Exception as exc:
                log.error("reload_failed", part=name, error=str(exc))
                result[name] = {"error": str(exc)}
        return result

    # -- status --------------------------------------------------------------------------
    def status(self, tail: bool = True) -> StatusReply:
        out: StatusReply = {
            "state": self.engine.state.value,
            "version": __version__,
            "reasons": self.engine.reasons(),
            "steps": self.engine.snapshot(),
            "services": self.services.snapshot(tail=tail),
            "daemon": self._daemon_info(),
        }
        if self.session is not None:
            out["session"] = self.session.status()
        # the parts' sections (network, limits, proxy: StatusReply names them; a test may
        # register more), each under its part's name
        sections = cast("dict[str, object]", out)
        for name, fn in self.extra_status.items():
            try:
                sections[name] = fn()
            except Exception as exc:
                sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
            _merge_degraded(out, name, _degraded_of(sections[name]))
        return out

    def health(self) -> HealthReply:
        """``status`` with ``brief``: only the state and its reasons, as ``status`` gives
        them (``status --check``, the HEALTHCHECK). As cheap as ``ping``: no process tree,
        mount table or section is built; each part answers its degraded probe."""
        out: HealthReply = {"state": self.engine.state.value, "reasons": self.engine.reasons()}
        for name, fn in self.extra_status.items():
            probe = self.degraded_probes.get(name)
            try:
                degraded = probe() if probe is not None else _degraded_of(fn())
            except Exception:
                degraded = None  # as in status(), where the section then shows the error
            _merge_degraded(out, name, degraded)
        return out

    def _daemon_info(self) -> DaemonInfo:
        # two /proc reads a request add up: sample memory at most once a second, so a crowd of
        # status clients costs the daemon almost nothing.
        now = time.monotonic()
        cached = self._info_cache
        if cached is None or now - cached[0] > 1.0:
            cached = self._info_cache = (now, self._sample_info())
        return {**cached[1], "uptime_s": round(time.time() - self.started, 1),
                "heap": HEAP.status(),  # settle_heap, after boot
                "boot_s": (None if self.engine.finished is None
                           else round(self.engine.finished - self.engine.started, 3))}

    def _sample_info(self) -> DaemonSample:
        # /proc, as psutil reads it, without psutil: the idle daemon does not keep it
        info: DaemonSample = {
            "pid": os.getpid(),
            "rss_bytes": _rss_bytes("self"),
            "socket": self.settings.socket,
        }
        parent = os.getppid()
        with contextlib.suppress(OSError, ValueError, IndexError):  # the parent is gone
            with open(f"/proc/{parent}/comm") as f:
                name = f.read().strip()
            if parent > 0 and name.startswith(("codetainerd", "python")):
                rss = _rss_bytes(str(parent))
                info["init_pid"] = parent
                info["init_rss_bytes"] = rss
        return info

    # -- control handlers ----------------------------------------------------------------
    async def op_ping(self, req: Request) -> dict[str, Any]:
        return {"pong": True, "state": self.engine.state.value}

    async def op_status(self, req: Request) -> StatusReply | HealthReply:
        if req.args.get("brief"):
            return self.health()
        return self.status(tail=bool(req.args.get("tail", True)))

    async def op_events(self, req: Request, send: Send) -> dict[str, Any]:
        sub = self.events.subscribe(replay=bool(req.args.get("replay", False)))
        try:
            async for ev in sub:
                await send(ev)
        finally:
            sub.close()
        raise RequestError(protocol.BUSY, "event stream closed: you were not reading fast enough"
                           if sub.overflowed else "event stream closed: daemon stopping")

    async def op_wait(self, req: Request, send: Send) -> dict[str, Any]:
        """Replay the boot so far, stream until it ends, then give the outcome."""
        sub = self.events.subscribe()
        try:
            for rec in self.engine.snapshot():
                if rec["state"] != "PENDING":
                    await send({"event": "boot.step", **rec})
            while not self.engine.done.is_set():
                get = asyncio.ensure_future(sub.queue.get())
                done_wait = asyncio.ensure_future(self.engine.done.wait())
                await asyncio.wait({get, done_wait}, return_when=asyncio.FIRST_COMPLETED)
                done_wait.cancel()
                if get.done():
                    ev = get.result()
                    if ev is None:
                        raise RequestError(protocol.BUSY, "too slow reading the event stream")
                    await send(ev)
                else:
                    get.cancel()
            while not sub.queue.empty():
                ev = sub.queue.get_nowait()
                if ev is not None:
                    await send(ev)
            if (self.session is not None and self.engine.state in
                    (BootState.READY, BootState.DEGRADED)
                    and self.session.attach_target() is None):
                # attach waits for the session, not just the boot: forward until it exists
                deadline = time.monotonic() + 60.0
                while time.monotonic() < deadline:
                    try:
                        ev = await asyncio.wait_for(sub.queue.get(), deadline - time.monotonic())
                    except TimeoutError:
                        break
                    if ev is None:
                        break
                    await send(ev)
                    if ev.get("event") in ("session.ready", "session.failed"):
                        break
        finally:
            sub.close()
        return {"state": self.engine.state.value, "reasons": self.engine.reasons()}

    def _service(self, req: Request) -> str:
        name = req.args.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(protocol.BAD_REQUEST, f"{req.op!r} needs args.name (a service)")
        try:
            self.services.get(name)
        except UnknownService as exc:
            raise RequestError(protocol.NOT_FOUND, exc.message) from None
        return name

    async def op_start(self, req: Request) -> ServiceStatus:
        name = self._service(req)
        svc = self.services.start(name)
        await svc.wait_state({svc.state.RUNNING, svc.state.FATAL, svc.state.BACKOFF},
                             svc.config.startsecs + 2)
        return svc.snapshot()

    async def op_stop(self, req: Request) -> ServiceStatus:
        name = self._service(req)
        svc = self.services.get(name)
        await svc.stop_and_wait()
        return svc.snapshot()

    async def op_restart(self, req: Request) -> ServiceStatus:
        await self.op_stop(req)
        return await self.op_start(req)

    async def op_reload(self, req: Request) -> dict[str, Any]:
        return await self.reload()

    async def op_shutdown(self, req: Request) -> dict[str, Any]:
        self.queue.put_nowait(("shutdown", None))
        return {"state": "STOPPING"}

    # -- top -----------------------------------------------------------------------------
    async def run(self) -> int:
        try:
            await self.startup()
        except DaemonHalt as halt:
            log.error("daemon_halt", reason=halt.reason, exit_code=int(halt.code))
            await self.control.close()
            return int(halt.code)
        code = await self.main_loop()
        return int(await self.shutdown(code))


def _degraded_of(section: object) -> str | None:
    degraded = section.get("degraded") if isinstance(section, dict) else None
    return str(degraded) if degraded else None


def _merge_degraded(out: HealthReply, name: str, degraded: str | None) -> None:
    """A part that is degraded now (the DNS server down, every lookup failing) makes the
    whole DEGRADED while it lasts, whatever the boot ended as."""
    if degraded:
        out["reasons"] = [*out["reasons"], f"{name}: {degraded}"]
        if out["state"] == BootState.READY.value:
            out["state"] = BootState.DEGRADED.value


def main(command: Command) -> int:
    """Run the daemon for a command line and settings read by ``init/cmdline.py``."""
    from codetainer import log as logsetup

    settings = command.settings
    logsetup.configure(settings.log_level, settings.log_format)
    try:
        daemon = Daemon(settings, names=command.steps, settle_heap_after_boot=True)
    except ValueError as exc:
        print(f"codetainerd: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    return asyncio.run(daemon.run())
