"""What the agent can consume, and who the OOM killer takes first.

The agent runs builds, test suites and package installs on a small machine; nothing in
its tree may starve the init, the daemon or the DNS server. The parts:

* ``oom_score_adj`` (here): the init -1000, the daemon -999, supervised services -900,
  every agent process +1000 (set in the agent's exec chain, ``boot/privileges.py``);
* the agent's cgroup and its memory, pids and CPU limits (``cgroup.py``), planned from
  settings (``plan.py``) by the ``limits`` boot step, watched for OOM kills and reported
  in ``status`` (``controller.py``);
* per process, whatever the cgroups can do: RLIMIT_NPROC and nice 10 (the exec chain).

Only the standard library is imported here: the init (``init/pid1.py``) uses it.
"""

from __future__ import annotations

import os

#: the init: the OOM killer never picks it
INIT_OOM_SCORE_ADJ = -1000
#: the daemon: only when nothing else is left (-1000 would let a leak in it hang the machine)
DAEMON_OOM_SCORE_ADJ = -999
#: supervised services (the DNS server): after every agent process
SERVICE_OOM_SCORE_ADJ = -900
#: every agent process: first
AGENT_OOM_SCORE_ADJ = 1000


def set_oom_score_adj(value: int, pid: int | str = "self") -> str | None:
    """Write ``/proc/<pid>/oom_score_adj``; None, or why it failed (lowering it needs
    CAP_SYS_RESOURCE; a process that already exited is gone)."""
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open /proc/{pid}/oom_score_adj: {exc.strerror}"
    try:
        os.write(fd, str(value).encode())
    except OSError as exc:
        return f"cannot set oom_score_adj {value} for {pid}: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def read_oom_score_adj(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
