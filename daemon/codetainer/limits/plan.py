"""The agent's limits as typed values, from the ``CODETAINER_AGENT_*`` settings.

Validated once (an error names the variable and a valid value); everything else
(the exec chain's arguments, the cgroup files) is rendered from these values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codetainer.boot.privileges import ExecLimits
from codetainer.limits import AGENT_OOM_SCORE_ADJ

if TYPE_CHECKING:
    from codetainer.settings import Settings

#: below this the agent, its tmux server and shells alone (~40 tasks) would not fit
MIN_PIDS = 64
MIN_MEMORY = 64 << 20
#: an absolute memory setting is capped here, so the daemon and services keep the rest
MAX_MEMORY_FRACTION = 0.9
#: the agent's pids.max stays this far below a limit the container already has
#: (``docker run --pids-limit``), capped at a quarter of that limit
PIDS_RESERVE = 128
#: the daemon's cgroup keeps cgroup v2's default weight; the agent's is set against it
DEFAULT_CPU_WEIGHT = 100

_SIZE = re.compile(r"^([1-9][0-9]*)([kmgKMG]?)$")
_PERCENT = re.compile(r"^([1-9][0-9]?|100)%$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _int(name: str, raw: str, low: int, high: int, what: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ValueError(f"CODETAINER_{name.upper()}={raw!r} is not valid: set it to {what} "
                         f"from {low} to {high}")
    return value


@dataclass(frozen=True)
class LimitSettings:
    memory_bytes: int | None  # an absolute size, or
    memory_percent: int | None  # a share of the container's memory
    pids: int
    nice: int
    cpu_weight: int

    @classmethod
    def parse(cls, settings: Settings) -> LimitSettings:
        """Raises ValueError naming the variable and what to set it to."""
        raw = settings.agent_memory.strip()
        size, percent = _SIZE.match(raw), _PERCENT.match(raw)
        memory_bytes = memory_percent = None
        if size:
            memory_bytes = int(size.group(1)) * _UNITS[size.group(2).lower()]
            if memory_bytes < MIN_MEMORY:
                size = None
        elif percent:
            memory_percent = int(percent.group(1))
        if not (size or percent):
            raise ValueError(f"CODETAINER_AGENT_MEMORY={settings.agent_memory!r} is not valid: "
                             "set it to a size of at least 64m (3g, 2048m) or a percentage "
                             "of the container's memory (75%)")
        return cls(
            memory_bytes=memory_bytes,
            memory_percent=memory_percent,
            pids=_int("agent_pids", settings.agent_pids, MIN_PIDS, 4_194_304,
                      "a number of processes and threads"),
            nice=_int("agent_nice", settings.agent_nice, 0, 19, "a nice value"),
            cpu_weight=_int("agent_cpu_weight", settings.agent_cpu_weight, 1, 10_000,
                            "a cgroup v2 CPU weight (the daemon's is 100)"),
        )

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
    get before the ``limits`` step ran, or without it; the defaults when a setting is bad
    (the step fails the boot on it)."""
    try:
        return LimitSettings.parse(settings).exec_limits()
    except ValueError:
        return ExecLimits()
