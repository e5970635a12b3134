"""Boot step ``readonly-root``: after it, only the tmpfs mounts are writable.

The root mount is remounted read-only as a *mount* (``MS_REMOUNT|MS_BIND|MS_RDONLY``,
what ``mount -o remount,bind,ro /`` does), keeping its other per-mount flags. Unlike a
superblock remount this touches nothing but this mount in this mount namespace, which
is all the agent can reach, and it cannot fail because some other process holds a file
open for writing. The agent cannot undo it: it has no capabilities at all (see
:mod:`codetainer.boot.privileges`). The step then proves the result: a write to the
root fails with EROFS and the tmpfs mounts still take writes.
"""

from __future__ import annotations

import errno
import os

import structlog

from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.filesystem import (
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_REMOUNT,
    mount,
    writable,
)

log = structlog.get_logger("codetainer.boot")

# statvfs f_flag bit -> mount(2) flag, for the per-mount flags a bind remount must keep
_KEEP = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}


def remount_readonly(path: str = "/") -> None:
    current = os.statvfs(path).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st, ms in _KEEP.items():
        if current & st:
            flags |= ms
    mount(None, path, None, flags, None)


def root_is_readonly(path: str = "/") -> bool:
    if not os.statvfs(path).f_flag & os.ST_RDONLY:
        return False
    probe = os.path.join(path, f".codetainer-ro-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return exc.errno == errno.EROFS
    os.close(fd)
    os.unlink(probe)
    return False


async def _run(ctx: BootContext) -> str:
    s = ctx.settings
    if not s.readonly_root:
        log.warning("readonly_root_disabled", setting="CODETAINER_READONLY_ROOT")
        return "disabled by CODETAINER_READONLY_ROOT=0"
    if not root_is_readonly("/"):
        try:
            remount_readonly("/")
        except OSError as exc:
            raise StepError(
                f"cannot remount / read-only: {os.strerror(exc.errno or 0)}",
                "the daemon needs CAP_SYS_ADMIN (run it as root with that capability), "
                "or set CODETAINER_READONLY_ROOT=0 to run with a writable root",
            ) from None
    if not root_is_readonly("/"):
        raise StepError("/ still accepts writes after the read-only remount",
                        "check `findmnt /` for another mount stacked on the root")
    must_write = [s.workspace, s.home, "/tmp", s.run_dir]
    stuck = [p for p, ok in writable(must_write).items() if not ok]
    if stuck:
        raise StepError(f"not writable after the root went read-only: {', '.join(stuck)}",
                        "these must be tmpfs mounts (the filesystem step mounts them)")
    log.info("root_readonly", writable=must_write)
    return "/ read-only; writable: " + ", ".join(must_write)


def rootfs_step() -> Step:
    return Step("readonly-root", _run, timeout=5.0, policy=Policy.FATAL,
                requires=("filesystem",),
                description="remount / read-only; only the tmpfs mounts stay writable")
