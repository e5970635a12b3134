"""All supervised services: ordered start/stop by priority, reload by diff."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from codetainer.events import EventBus
from codetainer.services.config import ServiceConfig, load_services
from codetainer.services.process import Service
from codetainer.services.states import ProcessState

if TYPE_CHECKING:
    from codetainer.status import ServiceStatus

log = structlog.get_logger("codetainer.services")

UP = {ProcessState.RUNNING}


class UnknownService(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.message = f"no service named {name!r}; known services: {', '.join(known) or 'none'}"


class ServiceManager:
    def __init__(self, path: Path, events: EventBus, base_env: dict[str, str] | None = None) -> None:
        self.path = path
        self.events = events
        self.base_env = base_env
        self.services: dict[str, Service] = {}
        self._listeners: dict[str, list[Callable[[str, str], None]]] = {}

    def load(self) -> None:
        """Read the services file (raises ServiceConfigError with a usable message)."""
        configs = load_services(self.path)
        for cfg in configs:
            self.services[cfg.name] = self._make(cfg)
        log.info("services_loaded", path=str(self.path), services=[c.name for c in configs])

    def _make(self, cfg: ServiceConfig) -> Service:
        svc = Service(cfg, self.events, self.base_env)
        svc.output_listeners.extend(self._listeners.get(cfg.name, []))
        svc.run()
        return svc

    def add_output_listener(self, name: str, fn: Callable[[str, str], None]) -> None:
        """Call ``fn(stream, line)`` for each output line of service ``name`` (survives reload)."""
        self._listeners.setdefault(name, []).append(fn)
        if name in self.services:
            self.services[name].output_listeners.append(fn)

    def get(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            raise UnknownService(name, sorted(self.services)) from None

    def ordered(self) -> list[Service]:
        return sorted(self.services.values(), key=lambda s: (s.config.priority, s.name))

    def start_autostart(self, exclude: set[str] | None = None) -> list[str]:
        started = []
        for svc in self.ordered():
            if svc.config.autostart and svc.name not in (exclude or set()):
                self.start(svc.name)
                started.append(svc.name)
        return started

    def start(self, name: str) -> Service:
        svc = self.get(name)
        svc.start()
        return svc

    async def wait_running(self, names: list[str], timeout: float) -> list[str]:
        """Wait until every named service is RUNNING; return those that are not."""
        await asyncio.gather(*(self.get(n).wait_state(UP | {ProcessState.FATAL}, timeout)
                               for n in names))
        return [n for n in names if self.get(n).state is not ProcessState.RUNNING]

    def not_running(self) -> list[str]:
        """Autostart services that are not RUNNING (readiness)."""
        return [s.name for s in self.ordered()
                if s.config.autostart and s.state is not ProcessState.RUNNING]

    async def stop_all(self) -> None:
        """Stop in descending priority; one priority level at a time, each to its deadline."""
        by_prio = itertools.groupby(reversed(self.ordered()), key=lambda s: s.config.priority)
        for _prio, group in by_prio:
            svcs = list(group)
            await asyncio.gather(*(s.stop_and_wait() for s in svcs))
        for svc in self.services.values():
            await svc.close()

    async def kill_all(self) -> None:
        """Fast shutdown: SIGKILL every service's process group now."""
        for svc in self.services.values():
            if svc.fsm.pid:
                try:
                    os.killpg(svc.fsm.pid, 9)
                except ProcessLookupError:
                    pass

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the file: changed programs restart, removed stop, added start."""
        new = {c.name: c for c in load_services(self.path)}
        added = [n for n in new if n not in self.services]
        removed = [n for n in self.services if n not in new]
        changed = [n for n in new if n in self.services and self.services[n].config != new[n]]
        for name in removed:
            svc = self.services.pop(name)
            await svc.stop_and_wait()
            await svc.close()
        for name in changed:
            old = self.services[name]
            was_up = old.fsm.wants_running or old.state in UP
            await old.stop_and_wait()
            await old.close()
            self.services[name] = self._make(new[name])
            if was_up or new[name].autostart:
                self.start(name)
        for name in added:
            self.services[name] = self._make(new[name])
            if new[name].autostart:
                self.start(name)
        result = {"added": added, "changed": changed, "removed": removed,
                  "unchanged": sorted(set(new) - set(added) - set(changed))}
        log.info("services_reloaded", **result)
        self.events.publish("services.reloaded", **result)
        return result

    def snapshot(self, tail: bool = True) -> list[ServiceStatus]:
        out = []
        for svc in self.ordered():
            snap = svc.snapshot()
            if not tail:
                snap.pop("tail", None)
            out.append(snap)
        return out
