"""The init (``pid1.py``) and what it hands on (``environ.py``). What the daemon also
reads of the init's work lives here, so the daemon never imports the init module (which
imports the daemon)."""

from __future__ import annotations

PR_GET_DUMPABLE = 3


def dumpable() -> bool:
    """Whether this process may be dumped or ptraced by its own uid (PR_GET_DUMPABLE);
    ``codetainerd`` (``pid1.py``) makes itself and the daemon not."""
    import ctypes  # only when asked: the init imports this package first

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)) != 0
