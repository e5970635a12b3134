"""The ``limits`` boot step, the OOM watch and the ``limits`` part of ``status``.

The step (fatal only on a bad ``CODETAINER_AGENT_*`` setting) plans the agent's limits,
creates its cgroup where the container allows it (``cgroup.py``) and settles the
per-process limits every agent process starts under (:meth:`exec_limits`: the tmux
server and clients, plugin installs, ``codetainer attach``'s client). Without a writable
cgroup the agent runs under RLIMIT_NPROC, nice and ``oom_score_adj`` alone, and status
says so: ``rlimit only (no writable cgroup: why)``. Before the step has run (or when
``--steps`` leaves it out) the per-process limits are the settings' own: never none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING

import structlog

from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.filesystem import mounts
from codetainer.boot.privileges import AgentUser, ExecLimits
from codetainer.limits import read_oom_score_adj
from codetainer.limits.cgroup import (
    AgentCgroup,
    CgroupError,
    choose,
    discover,
    read,
    remove,
    setup,
)
from codetainer.limits.oom import KernelLog, OomWatch, vmstat_oom_kills
from codetainer.limits.plan import LimitSettings, settings_exec_limits
from codetainer.units import human_bytes

if TYPE_CHECKING:
    from codetainer.events import EventBus
    from codetainer.services.manager import ServiceManager
    from codetainer.settings import Settings
    from codetainer.status import CgroupMemory, CgroupPids, LimitsStatus

log = structlog.get_logger("codetainer.limits")

OOM_POLL_S = 1.0
CAP_SYS_RESOURCE = 24
NO_CAP_SYS_RESOURCE = (
    "no CAP_SYS_RESOURCE: the init, the daemon and the services stay at 0, and an agent "
    "process may lower its +1000 back to 0 (Docker: --cap-add SYS_RESOURCE). Its own "
    "cgroup's memory limit, where there is one, still confines OOM kills to the agent")


def has_cap_sys_resource(status: str = "/proc/self/status") -> bool:
    """Only with it can the daemon lower an oom_score_adj, and make the agent's +1000 a
    floor the agent cannot lower (the kernel records a privileged write as the minimum)."""
    for line in (read(status) or "").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def machine_memory(meminfo: str = "/proc/meminfo") -> int:
    for line in (read(meminfo) or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no MemTotal in {meminfo}")


class LimitsController:
    def __init__(self, settings: Settings, events: EventBus,
                 services: ServiceManager | None = None) -> None:
        self.settings = settings
        self.events = events
        self.services = services
        self.cgroup: AgentCgroup | None = None
        self.why = "the limits step has not run"
        self._exec = settings_exec_limits(settings)
        self.oom: OomWatch | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what agent processes start under -------------------------------------------------

    def exec_limits(self) -> ExecLimits:
        return self._exec

    @property
    def mode(self) -> str:
        if self.cgroup is None:
            return "rlimit only"
        return f"cgroup v{self.cgroup.version}"

    def describe(self) -> str:
        if self.cgroup is None:
            return f"rlimit only (no writable cgroup: {self.why})"
        return self.cgroup.describe()

    # -- boot step -----------------------------------------------------------------------

    def step(self) -> Step:
        return Step("limits", self._run, timeout=10.0, policy=Policy.FATAL,
                    description="the agent's memory, process and CPU limits")

    async def _run(self, ctx: BootContext) -> str:
        planned = LimitSettings.parse(self.settings)  # checked when the settings were parsed
        try:
            user = AgentUser.lookup(self.settings.agent_user, self.settings.home)
        except LookupError as exc:
            raise StepError(str(exc)) from None
        total = machine_memory()
        try:
            version, chosen = choose(discover(read("/proc/self/cgroup") or "", mounts()))
            self.cgroup = setup(version, chosen, planned, total)
        except CgroupError as exc:
            self.cgroup, self.why = None, str(exc)
        cg = self.cgroup
        self._exec = planned.exec_limits(cg.procs_files if cg else (),
                                         pids_cgroup=cg is not None and "pids" in cg.dirs)
        self.oom = self._oom_watch(user.uid)
        self._task = asyncio.create_task(self.watch(), name="limits:oom")
        ctx.teardowns["limits"] = self.close
        summary = self.summary()
        log.info("agent_limits", mode=self.mode, detail=self.describe(), summary=summary,
                 leaf=cg.leaf if cg else None)
        return summary

    def _oom_watch(self, uid: int) -> OomWatch:
        cg, kmsg = self.cgroup, KernelLog()
        path = cg.file("memory", "memory.oom") if cg is not None else None
        if cg is not None and path is not None:
            return OomWatch(lambda: cg.figure("memory", "memory.oom", "oom_kill"), "agent",
                            path, uid, cg.memcg, kmsg)
        return OomWatch(vmstat_oom_kills, "machine", "/proc/vmstat", uid, None, kmsg)

    def summary(self) -> str:
        cg, ex = self.cgroup, self._exec
        parts = []
        if cg is not None:
            if cg.memory_max is not None:
                parts.append(f"memory {human_bytes(cg.memory_max)}")
            if cg.pids_max is not None:
                parts.append(f"pids {cg.pids_max}")
            if cg.cpu_weight is not None:
                parts.append(f"cpu weight {cg.cpu_weight}")
        parts.append(f"nproc {ex.nproc}, nice {ex.nice}, oom_score_adj {ex.oom_score_adj}")
        return f"{self.describe()}: " + ", ".join(parts)

    # -- OOM watch -----------------------------------------------------------------------

    async def watch(self) -> None:
        next_tick = time.monotonic()
        while True:
            next_tick += OOM_POLL_S
            self.check()
            now = time.monotonic()
            if now > next_tick:
                log.warning("limits_tick_overrun", late_s=round(now - next_tick, 3))
                next_tick = now
            await asyncio.sleep(next_tick - now)

    def check(self) -> None:
        oom = self.oom
        if oom is None or not oom.poll():
            return
        fields = {"count": oom.count, "command": oom.command, "scope": oom.scope}
        log.warning("agent_oom_killed" if oom.scope == "agent" else "oom_killed", **fields)
        self.events.publish("limits.oom_kill", **fields)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.oom is not None and self.oom.log is not None:
            self.oom.log.close()
        if self.cgroup is not None:
            for left in remove(self.cgroup):
                log.info("agent_cgroup_left", reason=left)

    # -- status --------------------------------------------------------------------------

    def status(self) -> LimitsStatus:
        """The ``limits`` section: data only (``render_limits`` in the CLI shows it)."""
        cg = self.cgroup
        out: LimitsStatus = {
            "mode": self.mode, "no_cgroup": self.why if cg is None else None,
            "process": self._exec.as_dict(), "cgroup": None, "oom_score_adj": {},
            "oom_note": None, "oom_kills": None}
        if cg is not None:
            fig = cg.figure
            memory: CgroupMemory | None = None if cg.memory_max is None else {
                "max": cg.memory_max, "current": fig("memory", "memory.current")}
            pids: CgroupPids | None = None if cg.pids_max is None else {
                "max": cg.pids_max, "current": fig("pids", "pids.current"),
                "refused": fig("pids", "pids.events", "max")}
            out["cgroup"] = {"version": cg.version, "dirs": dict(cg.dirs), "leaf": cg.leaf,
                             "memory": memory, "pids": pids, "cpu_weight": cg.cpu_weight}
        out["oom_score_adj"] = self._oom_scores()
        out["oom_note"] = None if has_cap_sys_resource() else NO_CAP_SYS_RESOURCE
        out["oom_kills"] = self.oom.status() if self.oom is not None else None
        return out

    def degraded(self) -> str | None:
        """Never: what the limits refuse or kill is reported in status, it does not make
        the daemon DEGRADED (``status --check``'s probe, instead of building status)."""
        return None

    def _oom_scores(self) -> dict[str, int | None]:
        scores: dict[str, int | None] = {}
        if os.environ.get("CODETAINER_INIT", "1") != "0":  # init/pid1.py forked us
            scores["init"] = read_oom_score_adj(os.getppid())
        scores["daemon"] = read_oom_score_adj()
        if self.services is not None:
            for svc in self.services.ordered():
                if svc.fsm.pid:
                    scores[svc.name] = read_oom_score_adj(svc.fsm.pid)
        scores["agent"] = self._exec.oom_score_adj
        return scores

