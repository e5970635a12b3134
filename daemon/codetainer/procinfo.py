"""What reading another process's /proc entry may raise.

A process that exits while psutil reads it is ``psutil.NoSuchProcess`` (a
``psutil.Error``) almost always; in the window where ``/proc/<pid>/stat`` reads empty,
psutil's parser fails with ``IndexError`` instead (seen in CI while tmux exited), and a
vanished ``/proc`` file can surface as a plain ``OSError``. Code that looks at processes
it does not own (tmux, the agent's tree, the init) treats all of them as "gone".
"""

from __future__ import annotations

#: ``(psutil.Error, IndexError, OSError)``; psutil (~10 ms, ~1 MiB) is imported the first
#: time this is read (``procinfo.PROCESS_GONE`` at the point of use), not by the daemon's
#: boot, which reads no other process's /proc
PROCESS_GONE: tuple[type[BaseException], ...]


def __getattr__(name: str) -> object:
    if name != "PROCESS_GONE":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import psutil

    value = (psutil.Error, IndexError, OSError)
    globals()[name] = value
    return value
