"""The agent's limits as typed values, from the ``CODETAINER_AGENT_*`` settings.

The settings were validated once when they were parsed (a bad value exits 64 naming the
variable); everything else (the exec chain's arguments, the cgroup files) is rendered
from these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from codetainer.boot.privileges import ExecLimits
from codetainer.limits import AGENT_OOM_SCORE_ADJ
from codetainer.settings import MIN_MEMORY

if TYPE_CHECKING:
    from codetainer.settings import Settings

#: an absolute memory setting is capped here, so the daemon and services keep the rest
MAX_MEMORY_FRACTION = 0.9
#: the agent's pids.max stays this far below a limit the container already has
#: (``docker run --pids-limit``), capped at a quarter of that limit
PIDS_RESERVE = 128
#: the daemon's cgroup keeps cgroup v2's default weight; the agent's is set against it
DEFAULT_CPU_WEIGHT = 100


@dataclass(frozen=True)
class LimitSettings:
    memory_bytes: int | None  # an absolute size, or
    memory_percent: int | None  # a share of the container's memory
    pids: int
    nice: int
    cpu_weight: int

    @classmethod
    def parse(cls, settings: Settings) -> LimitSettings:
        """From the typed settings (each value was checked when they were parsed)."""
        memory = settings.agent_memory
        return cls(memory_bytes=memory.size, memory_percent=memory.percent,
                   pids=settings.agent_pids, nice=settings.agent_nice,
                   cpu_weight=settings.agent_cpu_weight)

    def memory_for(self, available: int) -> int:
        """The agent's memory limit in a container of ``available`` bytes."""
        if self.memory_percent is not None:
            return max(MIN_MEMORY, available * self.memory_percent // 100)
        assert self.memory_bytes is not None
        return min(self.memory_bytes, int(available * MAX_MEMORY_FRACTION))

    def pids_for(self, parent_max: int | None) -> int:
        """The agent's pids.max under a parent limited to ``parent_max`` (None: no limit)."""
        if parent_max is None:
            return self.pids
        return max(1, min(self.pids, parent_max - min(PIDS_RESERVE, parent_max // 4)))

    @property
    def cpu_shares(self) -> int:
        """cgroup v1's ``cpu.shares`` for the weight (1024 is v2's 100)."""
        return max(2, self.cpu_weight * 1024 // DEFAULT_CPU_WEIGHT)

    def exec_limits(self, cgroup_procs: tuple[str, ...] = (), *,
                    pids_cgroup: bool = False) -> ExecLimits:
        """Per-process limits. With a pids cgroup holding the agent, RLIMIT_NPROC is only a
        backstop at twice the setting: it counts the uid machine-wide (under Docker without
        user namespaces, every container's uid 1000), while pids.max counts exactly the
        agent's tree."""
        return ExecLimits(oom_score_adj=AGENT_OOM_SCORE_ADJ, nice=self.nice,
                          nproc=self.pids * 2 if pids_cgroup else self.pids,
                          cgroup_procs=cgroup_procs)


def settings_exec_limits(settings: Settings) -> ExecLimits:
    """The per-process limits from the settings alone (no cgroup): what agent processes
    get before the ``limits`` step ran, or without it."""
    return LimitSettings.parse(settings).exec_limits()
