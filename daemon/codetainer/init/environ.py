"""Scrubbing secrets from a process's original environment block (standard library only).

Used by the PID-1 init right after it forks (it holds the same block as the daemon) and by
the secrets boot step. Kept free of heavy imports so the init stays small.
"""

from __future__ import annotations

import ctypes

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the init imports this)
if TYPE_CHECKING:
    from collections.abc import Iterable

#: Variables that carry credentials and must not stay in any long-lived process's
#: environment (``REPO_URL`` may embed a token).
SECRET_NAMES = ("GH_PAT", "CLAUDE_CODE_OAUTH_TOKEN", "GH_TOKEN", "GITHUB_TOKEN",
                "NODE_AUTH_TOKEN", "REPO_URL", "CLAUDE_PROMPT")


def scrub_process_environ(names: Iterable[str]) -> int:
    """Zero the values of ``names`` in this process's original environment block.

    ``os.environ.pop`` only drops the pointer; the bytes stay in the block the kernel
    shows as ``/proc/self/environ`` (readable by root). Returns how many were zeroed.
    Call it after the variables are gone from ``os.environ`` (the PID-1 init should call
    it too: it holds the same block).
    """
    wanted = {n.encode() + b"=" for n in names}
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:
        return 0
    # fields after "pid (comm)" start at field 3; env_start is field 50
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        env_start = int(fields[50 - 3])
    except (IndexError, ValueError):
        return 0
    zeroed = 0
    offset = 0
    for entry in block.split(b"\0"):
        for prefix in wanted:
            if entry.startswith(prefix) and len(entry) > len(prefix):
                ctypes.memset(env_start + offset + len(prefix), 0, len(entry) - len(prefix))
                zeroed += 1
        offset += len(entry) + 1
    return zeroed
