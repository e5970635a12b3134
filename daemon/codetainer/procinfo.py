"""What reading another process's /proc entry may raise.

A process that exits while psutil reads it is ``psutil.NoSuchProcess`` (a
``psutil.Error``) almost always; in the window where ``/proc/<pid>/stat`` reads empty,
psutil's parser fails with ``IndexError`` instead (seen in CI while tmux exited), and a
vanished ``/proc`` file can surface as a plain ``OSError``. Code that looks at processes
it does not own (tmux, the agent's tree, the init) treats all of them as "gone".
"""

from __future__ import annotations

import psutil

PROCESS_GONE: tuple[type[BaseException], ...] = (psutil.Error, IndexError, OSError)
