"""OOM kills in the agent's tree: how many, when, and which command.

The count comes from a kernel counter: the agent cgroup's ``oom_kill`` (cgroup v2
``memory.events``, v1 ``memory.oom_control``), which counts exactly the agent's kills;
without an agent memory cgroup, the machine's ``oom_kill`` in ``/proc/vmstat``
(every process's kills, so status calls it machine-wide). The time is when the daemon
saw the counter move (it looks every second). The command comes from the kernel log
(``/dev/kmsg``: the ``oom-kill:`` record names the task, its cgroup and uid) where the
daemon can read it (a VM such as a Fly Machine; Docker gives containers no ``/dev/kmsg``);
otherwise status says the command is unknown and why.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codetainer.status import OomKills

KMSG = "/dev/kmsg"
VMSTAT = "/proc/vmstat"
#: records read from the kernel log per look (its ring holds a few thousand)
MAX_RECORDS = 20_000

_OOM_KILL = re.compile(r"(?:^|,)task_memcg=(?P<memcg>[^,]*),task=(?P<task>.*),"
                       r"pid=(?P<pid>\d+),uid=(?P<uid>\d+)$")


def oom_kill_victim(record: str, uid: int, memcg: str | None) -> str | None:
    """The task an ``oom-kill:`` kernel record names, when it is the agent's: its uid, and
    (``memcg`` given) its memory cgroup, which the kernel names from the hierarchy's
    root, so under a cgroup namespace it only ends with ours."""
    _, _, text = record.partition(";")
    if not text.startswith("oom-kill:"):
        return None
    m = _OOM_KILL.search(text.rstrip("\n").split("\n", 1)[0])
    if m is None or int(m["uid"]) != uid:
        return None
    if memcg is not None and not (m["memcg"] == memcg or m["memcg"].endswith(memcg)):
        return None
    return m["task"]


class KernelLog:
    """New records of ``/dev/kmsg`` since the last call (from when it was opened)."""

    def __init__(self, path: str = KMSG) -> None:
        self.path = path
        self.why: str | None = None
        self.fd: int | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            self.close()
            self.why = f"no kernel log ({path}: {exc.strerror})"

    def records(self) -> list[str]:
        out: list[str] = []
        while self.fd is not None and len(out) < MAX_RECORDS:
            try:
                data = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue  # the ring overwrote records we had not read; go on from there
            except OSError as exc:
                self.why = f"kernel log unreadable ({exc.strerror})"
                self.close()
                break
            if not data:
                break
            out.append(data.decode(errors="replace"))
        return out

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


@dataclass
class OomWatch:
    """Counts OOM kills since boot from ``counter`` (a reader of the kernel's figure)."""

    counter: Callable[[], int | None]
    scope: str  # "agent" (its cgroup's counter) or "machine" (/proc/vmstat)
    source: str  # the file the count comes from
    uid: int
    memcg: str | None  # the agent's memory cgroup as the kernel names it, if it has one
    log: KernelLog | None = None

    def __post_init__(self) -> None:
        self.base = self.counter() or 0
        self.count = 0
        self.last: float | None = None
        self.command: str | None = None

    def poll(self) -> int:
        """Look once; returns how many new kills were seen."""
        now = self.counter()
        if now is None:
            return 0
        new = now - self.base - self.count
        if new <= 0:
            return 0
        self.count += new
        self.last = time.time()
        if self.log is not None:
            for record in self.log.records():
                victim = oom_kill_victim(record, self.uid, self.memcg)
                if victim is not None:
                    self.command = victim
        return new

    def status(self) -> OomKills:
        """``kernel_log``: None while the kernel log is read, else why it is not."""
        return {"count": self.count, "last": self.last, "command": self.command,
                "scope": self.scope, "source": self.source,
                "kernel_log": "no kernel log" if self.log is None else self.log.why}


def vmstat_oom_kills(path: str = VMSTAT) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
