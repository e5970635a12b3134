"""The one way the daemon runs a command to completion: spawn, wait with a deadline, kill
the whole process group, decode.

Every command starts in a session (and process group) of its own. At the deadline the
group gets SIGTERM, ``grace`` seconds later SIGKILL, so what the command forked (git's
helpers, the children of ``claude plugin install``) dies with it; a command that ends in
time is left alone with its group. The exit is collected the way the services' is: a
pidfd says when the process has exited and ``waitpid`` on that pid (never -1, which would
steal other children's statuses) reads the raw wait status, decoded by
:func:`codetainer.services.states.decode_wait_status` (``"exited 7"``, ``"killed by
SIGKILL"``). The leader is reaped last, so its process group id cannot be reused while
the group is still being signalled. No thread per child, unlike asyncio's own subprocesses.

A cancelled caller (a boot step's timeout) kills the group at once; the exit is then
collected in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from codetainer.services.states import decode_wait_status

#: after SIGTERM to the group at the deadline, this long before SIGKILL
GRACE = 1.0


class SpawnError(Exception):
    """The command could not be started at all (not found, not executable, bad cwd)."""

    def __init__(self, argv: Sequence[str], exc: OSError) -> None:
        self.argv = tuple(argv)
        self.errno = exc.errno
        self.strerror = exc.strerror or str(exc)
        super().__init__(f"cannot run {self.argv[0] if self.argv else '(nothing)'}: "
                         f"{self.strerror}")


@dataclass(frozen=True)
class Completed:
    """What a command did. ``code`` is its exit code, or ``-signum`` when a signal ended
    it (``decode_wait_status``'s convention, also ``Popen.returncode``'s)."""

    argv: tuple[str, ...]
    code: int
    exit: str  # "exited 0", "killed by SIGTERM"
    stdout: str
    stderr: str  # "" when merged into stdout
    timed_out: bool  # the deadline passed and the group was killed
    timeout: float

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.timed_out

    @property
    def outcome(self) -> str:
        """``"timed out after 5s"`` or ``exit``: what a message says happened."""
        return f"timed out after {self.timeout:g}s" if self.timed_out else self.exit


def reap(proc: subprocess.Popen[bytes]) -> int | None:
    """Collect ``proc``'s exit without blocking: its raw wait status, or None while it runs.

    ``waitpid`` on its own pid only; ``Popen`` is told, so it never waits again (nor
    steals the status later in its ``_cleanup``)."""
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:
        pid, status = proc.pid, 0xFF00  # cannot happen unless someone stole it: "exited 255"
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status


class ExitWatch:
    """Says when a process has exited (a zombie counts: nothing is reaped here), through a
    pidfd: works for any process, not only children. :meth:`close` when done with it.
    Raises ProcessLookupError when ``pid`` is gone already."""

    def __init__(self, pid: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.pid = pid
        self.fd = os.pidfd_open(pid)
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        self._loop.remove_reader(self.fd)
        if not self.exited.done():
            self.exited.set_result(None)

    def close(self) -> None:
        if self.fd < 0:
            return
        if not self.exited.done():
            self._loop.remove_reader(self.fd)
            self.exited.cancel()
        os.close(self.fd)
        self.fd = -1


class _Collect(asyncio.Protocol):
    """Gathers one output pipe; ``closed`` is done at EOF (every writer closed it)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def run(argv: Sequence[str], *, timeout: float, input: bytes | None = None,
              env: Mapping[str, str] | None = None, cwd: str | None = None,
              merge_stderr: bool = False, grace: float = GRACE) -> Completed:
    """Run ``argv`` (no shell) to completion within ``timeout`` seconds.

    ``input`` is written to its stdin (else stdin is /dev/null); ``merge_stderr`` sends
    stderr to stdout (``Completed.stderr`` is then empty). ``env`` None inherits the
    daemon's environment. Raises :class:`SpawnError` when it cannot start; a command
    that fails or times out is a :class:`Completed`, never an exception.
    """
    loop = asyncio.get_running_loop()
    proc = _spawn(argv, input is not None, env, cwd, merge_stderr)
    watch = ExitWatch(proc.pid)  # a child that is not reaped yet: it exists
    pipes = [p for p in (proc.stdout, proc.stderr, proc.stdin) if p is not None]
    transports: list[asyncio.BaseTransport] = []
    outs: list[_Collect] = []
    status: int | None = None
    try:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                transport, collect = await loop.connect_read_pipe(_Collect, pipe)
                transports.append(transport)
                outs.append(collect)
                pipes.remove(pipe)
        if input is not None and proc.stdin is not None:
            writer, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
            transports.append(writer)
            pipes.remove(proc.stdin)
            writer.write(input)
            writer.close()  # once the buffer is written; a reader that left is no error
        everything = [watch.exited, *(c.closed for c in outs)]
        _done, pending = await asyncio.wait(everything, timeout=timeout)
        timed_out = bool(pending)
        if timed_out:
            _killpg(proc.pid, signal.SIGTERM)
            await asyncio.wait(everything, timeout=grace)
            # Always, even when the leader went: a grandchild may ignore SIGTERM. The
            # leader is not reaped yet, so the group id is still this group's.
            _killpg(proc.pid, signal.SIGKILL)
            await asyncio.wait([watch.exited])
            # Output held open by something outside the group cannot hold us up.
            await asyncio.wait([c.closed for c in outs], timeout=grace)
        status = reap(proc)
        if status is None:  # the pidfd said it exited: cannot happen
            raise RuntimeError(f"{argv[0]} (pid {proc.pid}) exited but cannot be reaped")
    finally:
        for t in transports:
            t.close()
        for pipe in pipes:
            pipe.close()
        if status is None:  # cancelled (or a bug): the group dies now, the exit is read later
            _killpg(proc.pid, signal.SIGKILL)
            _reap_later(proc, watch)
        else:
            watch.close()
    code, exit_msg = decode_wait_status(status)
    stdout = outs[0].text() if outs else ""
    stderr = outs[1].text() if len(outs) > 1 else ""
    return Completed(tuple(argv), code, exit_msg, stdout, stderr, timed_out, timeout)


def _spawn(argv: Sequence[str], stdin: bool, env: Mapping[str, str] | None, cwd: str | None,
           merge_stderr: bool) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (its own process group); fork and exec only, the
    waiting is :func:`run`'s."""
    try:
        return subprocess.Popen(
            list(argv), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=dict(env) if env is not None else None, cwd=cwd, close_fds=True,
            start_new_session=True)
    except OSError as exc:
        raise SpawnError(argv, exc) from None


def _reap_later(proc: subprocess.Popen[bytes], watch: ExitWatch) -> None:
    """Reap ``proc`` once it has exited (after a SIGKILL: soon), without a caller."""
    if reap(proc) is not None:
        watch.close()
        return
    loop = asyncio.get_running_loop()
    fd = watch.fd

    def ready() -> None:
        if reap(proc) is not None:
            loop.remove_reader(fd)
            os.close(fd)

    if watch.exited.done() and not watch.exited.cancelled():
        # the pidfd said so, yet waitpid found nothing: cannot happen; do not spin
        watch.close()
        return
    loop.remove_reader(fd)
    watch.fd = -1  # the reader below owns it now
    loop.add_reader(fd, ready)
