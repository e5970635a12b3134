"""Cgroups a test or benchmark makes for a scratch root, so whatever the machine inside
does (an OOM, a fork bomb, every core spinning) stays inside limits the test chose.

``SandboxCgroups(memory=..., pids=...)`` creates ``ct-test-<pid>-<random>`` under the test
process's own cgroup in each cgroup v1 hierarchy named (these machines mount ``memory``,
``pids`` and ``cpu`` at ``/sys/fs/cgroup/<controller>``, writable), with the limits given;
``ScratchRoot(cgroups=sc.dirs)`` starts PID 1 in them and shows them inside as the
container's own cgroups. ``close()`` waits for what ran there to be gone (the scratch
root's teardown kills its PID namespace), SIGKILLs what is left (every process in these
cgroups was started by the test), and removes the directories, the daemon's own ``agent``
children first. Nothing outside the new directories is touched. A machine without such a
hierarchy raises :class:`SandboxCgroupsError` naming it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_cgroup(controller: str) -> str:
    """This process's cgroup in the v1 hierarchy of ``controller``."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    raise LookupError(controller)


class SandboxCgroupsError(RuntimeError):
    """A cgroup v1 hierarchy the caller asked for is not mounted (writable) here."""


class SandboxCgroups:
    def __init__(self, *, memory: int | None = None, pids: int | None = None,
                 controllers: tuple[str, ...] = ("memory", "pids", "cpu")) -> None:
        name = f"ct-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.dirs: dict[str, str] = {}
        try:
            for c in controllers:
                mount = CGROUP_ROOT / c
                if not (mount / "cgroup.procs").exists():
                    raise SandboxCgroupsError(
                        f"this test needs the cgroup v1 {c} hierarchy at {mount}: run it "
                        f"where /sys/fs/cgroup/{c} is mounted writable")
                d = mount / own_cgroup(c).lstrip("/") / name
                d.mkdir()
                self.dirs[c] = str(d)
            if memory is not None:
                Path(self.dirs["memory"], "memory.limit_in_bytes").write_text(str(memory))
            if pids is not None:
                Path(self.dirs["pids"], "pids.max").write_text(str(pids))
        except BaseException:
            self.close()
            raise

    def procs(self) -> list[int]:
        """Every process left in these cgroups or below them."""
        out: set[int] = set()
        for d in self.dirs.values():
            for procs in Path(d).rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    out.update(int(p) for p in procs.read_text().split())
        return sorted(out)

    def close(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.procs() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.procs():  # ours: only the sandbox ran here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.procs() and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        for d in self.dirs.values():
            for sub in sorted((p for p in Path(d).rglob("*") if p.is_dir()), reverse=True):
                sub.rmdir()
            Path(d).rmdir()
        self.dirs = {}

    def __enter__(self) -> SandboxCgroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
