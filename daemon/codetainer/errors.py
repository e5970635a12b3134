"""Exit codes and the one daemon-fatal exception.

Exit codes are reserved so that an orchestrator can tell a configuration problem (do
not restart) from a crash (restart may help). They are documented in README.md.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    #: the daemon crashed (unexpected exception): a bug, restarting may help
    CRASH = 1
    #: bad command line or settings: fix the configuration, do not restart
    USAGE = 64
    #: the services file could not be read: fix supervisord/codetainer.conf
    CONFIG = 78
    #: the daemon could not create its runtime directory or control socket
    RUNTIME = 71
    #: forced shutdown after a second SIGTERM/SIGINT
    FORCED = 130


class DaemonHalt(BaseException):
    """Raised to stop the daemon at once with a reserved exit code; caught only at the top."""

    def __init__(self, reason: str, code: ExitCode) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
