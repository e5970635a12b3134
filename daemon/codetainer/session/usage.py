"""Resource figures for ``codetainer status``: the agent's process tree and the tmpfs mounts.

A full ``/workspace`` (a tmpfs) is a common way for an agent to fail, so its usage is
shown as a bar next to the agent's CPU and memory. Everything here reads ``/proc`` through
psutil; :class:`UsageCache` samples at most once a second however often status is asked.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from codetainer.units import human_bytes

if TYPE_CHECKING:
    import psutil

    from codetainer.status import AgentTree, MountUsage

# psutil (~1 MiB, ~9 ms) is imported by the first sample, not with this module

BAR_WIDTH = 20
#: At or above this percentage a mount is flagged (``warn``), the agent is about to fail.
WARN_PERCENT = 90.0
#: The agent's tree and the mounts are sampled for status at most this often (as the
#: daemon's own memory figures are): a crowd polling status costs one sample a second.
SAMPLE_MAX_AGE = 1.0


def bar(percent: float, width: int = BAR_WIDTH) -> str:
    """``[#########-----------]`` for ``percent`` in 0..100 (clamped)."""
    p = min(max(percent, 0.0), 100.0)
    filled = round(p / 100 * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _mount_of(path: str, partitions: Iterable[Any]) -> Any | None:
    """The partition whose mount point is the longest prefix of ``path``."""
    real = os.path.realpath(path)
    best: Any | None = None
    for part in partitions:
        mp = part.mountpoint
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best.mountpoint)
        ):
            best = part
    return best


def mounts_usage(paths: Iterable[str]) -> list[MountUsage]:
    """Usage of the file systems holding ``paths`` (missing paths are left out)."""
    import psutil

    try:
        partitions = psutil.disk_partitions(all=True)
    except OSError:
        partitions = []
    out: list[MountUsage] = []
    for path in paths:
        if not os.path.isdir(path):
            continue
        try:
            du = psutil.disk_usage(path)
        except OSError:
            continue
        part = _mount_of(path, partitions)
        out.append({
            "path": path,
            "mountpoint": part.mountpoint if part is not None else None,
            "fstype": part.fstype if part is not None else None,
            "total": du.total,
            "used": du.used,
            "free": du.free,
            "percent": du.percent,
            "warn": du.percent >= WARN_PERCENT,
            "bar": f"{bar(du.percent)} {du.percent:5.1f}% "
            f"{human_bytes(du.used)}/{human_bytes(du.total)}",
        })
    return out


class TreeSampler:
    """CPU and memory of a process and all its descendants.

    ``psutil.Process.cpu_percent(None)`` measures since the previous call on the same
    object, so the objects are kept between samples; the first sample of a new process
    reads 0.0.
    """

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, root_pid: int | None) -> AgentTree | None:
        import psutil

        from codetainer.procinfo import PROCESS_GONE

        if root_pid is None or root_pid <= 0:
            self._procs.clear()
            return None
        try:
            root = self._procs.get(root_pid) or psutil.Process(root_pid)
            tree = [root, *root.children(recursive=True)]
        except PROCESS_GONE:
            self._procs.clear()
            return None
        seen: dict[int, psutil.Process] = {}
        cpu = 0.0
        rss = 0
        for found in tree:
            proc = found
            kept = self._procs.get(found.pid)
            if kept is not None:
                with contextlib.suppress(*PROCESS_GONE):
                    if kept.create_time() == found.create_time():
                        proc = kept  # the same process: keep its CPU baseline
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
            except PROCESS_GONE:
                continue
            seen[proc.pid] = proc
        self._procs = seen
        return {
            "pid": root_pid,
            "processes": len(seen),
            "cpu_percent": round(cpu, 1),
            "rss_bytes": rss,
            "rss": human_bytes(rss),
        }


class UsageCache:
    """The agent's process tree and the mounts it writes to, sampled again only when the
    last sample is older than ``max_age`` seconds or of another root pid (a respawned
    agent shows at once)."""

    def __init__(self, max_age: float = SAMPLE_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock
        self.tree = TreeSampler()
        self.samples = 0  # how many times it really sampled
        self._last: tuple[float, int | None, AgentTree | None, list[MountUsage]] | None = None

    def sample(self, pid: int | None, paths: Iterable[str],
               owned: Callable[[int], bool]) -> tuple[AgentTree | None, list[MountUsage]]:
        """``(tree, mounts)``: the tree from ``pid`` (None when there is none, or when
        ``owned(pid)`` says it is not the agent's) and :func:`mounts_usage` of ``paths``."""
        now = self.clock()
        last = self._last
        if last is None or last[1] != pid or now - last[0] > self.max_age:
            root = pid if pid is not None and owned(pid) else None
            last = self._last = (now, pid, self.tree.sample(root),
                                 mounts_usage(dict.fromkeys(paths)))
            self.samples += 1
        _at, _pid, tree, mounts = last
        return (None if tree is None else tree.copy()), [m.copy() for m in mounts]
