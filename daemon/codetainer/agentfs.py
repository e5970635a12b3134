"""Reading a file the agent could have replaced, as root, without following its links.

Root reads a few files under the agent's home after agent code has run (the readiness
check reads the Claude Code settings after ``claude plugin install`` ran as the agent).
The agent may have swapped any component of such a path for a symlink (to
``/etc/shadow``, to a FIFO that blocks the reader forever, to ``/dev/zero``): every
component is opened with ``O_NOFOLLOW`` relative to the one before (``openat``), the
last must be a regular file, and what is read is capped.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import PurePosixPath

#: Larger than any settings file the daemon writes; a bigger one is refused, not read.
READ_LIMIT = 1 << 20


class UnsafePath(OSError):
    """The path is not a plain file reached through plain directories."""


def read_beneath(top: str, rel: str, limit: int = READ_LIMIT) -> bytes:
    """The contents of ``top/rel``, refusing symlinks below ``top``, non-regular files and
    files over ``limit`` bytes. ``top`` itself is trusted (a mount point root owns)."""
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("", ".", "..", "/") for p in parts):
        raise UnsafePath(errno.EINVAL, f"not a plain relative path: {rel!r}")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(top, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            except OSError as exc:
                raise _explain(exc, top, rel) from None
            os.close(fd)
            fd = nxt
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer
            last = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            raise _explain(exc, top, rel) from None
    finally:
        os.close(fd)
    try:
        st = os.fstat(last)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(errno.EINVAL, f"{top}/{rel} is not a regular file")
        if st.st_size > limit:
            raise UnsafePath(errno.EFBIG, f"{top}/{rel} is over {limit} bytes")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(last, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise UnsafePath(errno.EFBIG, f"{top}/{rel} is over {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(last)


def _explain(exc: OSError, top: str, rel: str) -> OSError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnsafePath(exc.errno, f"{top}/{rel}: a component is a symlink or not a directory")
    return exc
