"""Low-level tmux client calls for the session manager: run, parse, wait.

Kept apart from :mod:`codetainer.session.tmux` so the manager reads as policy only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from codetainer import procinfo, runner

if TYPE_CHECKING:
    import psutil

    from codetainer.boot.privileges import AgentUser
    from codetainer.status import ClientStatus, PaneStatus

ROLE_OPTION = "@codetainer_role"
TMUX_TIMEOUT = 5.0

PANE_FMT = "\t".join([
    "P", "#{session_id}", "#{session_name}", "#{pane_id}", "#{pane_index}", "#{pane_dead}",
    "#{pane_dead_status}", "#{pane_dead_signal}", "#{pane_pid}", "#{pane_current_command}",
    "#{" + ROLE_OPTION + "}", "#{pid}",
])
CLIENT_FMT = "\t".join([
    "C", "#{client_tty}", "#{client_pid}", "#{client_uid}", "#{client_termname}",
    "#{client_width}x#{client_height}", "#{client_created}",
])
#: Messages of a tmux client that mean "there is no such server/session" (not a hiccup).
GONE = ("no server running", "error connecting", "can't find session", "can't find pane",
        "server exited", "lost server")


class SessionError(Exception):
    """The session could not be created. ``hint`` says what to do next."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class TmuxGone(Exception):
    """The server or the session does not exist (any more)."""


@dataclass
class Pane:
    id: str
    index: int
    dead: bool
    dead_status: int | None
    dead_signal: str | None
    pid: int | None
    command: str
    role: str

    def as_dict(self) -> PaneStatus:
        return {"id": self.id, "index": self.index, "role": self.role or None,
                "command": self.command, "pid": self.pid, "dead": self.dead,
                "dead_status": self.dead_status, "dead_signal": self.dead_signal}


@dataclass
class Snapshot:
    session_id: str
    name: str
    server_pid: int | None
    panes: list[Pane] = field(default_factory=list)
    clients: list[ClientStatus] = field(default_factory=list)


def int_or_none(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def parse_snapshot(out: str) -> Snapshot | None:
    """Parse the output of ``list-panes -F _PANE_FMT ; list-clients -F _CLIENT_FMT``."""
    snap: Snapshot | None = None
    clients: list[ClientStatus] = []
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == "P" and len(parts) >= 12:
            if snap is None:
                snap = Snapshot(parts[1], parts[2], int_or_none(parts[11]))
            snap.panes.append(Pane(
                id=parts[3], index=int_or_none(parts[4]) or 0, dead=parts[5] == "1",
                dead_status=int_or_none(parts[6]), dead_signal=parts[7] or None,
                pid=int_or_none(parts[8]), command=parts[9], role=parts[10],
            ))
        elif parts[0] == "C" and len(parts) >= 7:
            clients.append({"tty": parts[1], "pid": int_or_none(parts[2]), "uid": int_or_none(parts[3]),
                            "term": parts[4], "size": parts[5], "since": int_or_none(parts[6])})
    if snap is not None:
        snap.clients = clients
    return snap


async def run(argv: list[str], env: Mapping[str, str] | None = None,
               cwd: str | None = None, timeout: float = TMUX_TIMEOUT) -> tuple[int, str, str]:
    """``(code, stdout, stderr)`` of a tmux client; at the timeout its whole process group
    is killed (what a server made it run too) and :class:`SessionError` raised."""
    try:
        done = await runner.run(argv, timeout=timeout, env=env, cwd=cwd)
    except runner.SpawnError as exc:
        raise SessionError(str(exc)) from None
    if done.timed_out:
        raise SessionError(f"{os.path.basename(argv[0])} did not answer within "
                           f"{timeout:g}s")
    return done.code, done.stdout, done.stderr


def agent_process(pid: int, uid: int) -> psutil.Process | None:
    """``pid`` as a process, only while its real uid is ``uid`` (else None).

    A pid the agent's tmux server reports is the agent's to forge (a server of its own
    on the socket can name the init or the DNS server): the daemon signals or samples it
    only when it really belongs to the agent.
    """
    import psutil  # at first use: the boot reads no other process's /proc

    with contextlib.suppress(*procinfo.PROCESS_GONE):
        proc = psutil.Process(pid)
        if proc.uids().real == uid:
            return proc
    return None


async def wait_gone(pids: list[int], timeout: float) -> list[psutil.Process]:
    """Wait until ``pids`` exited (zombies count as gone); return the survivors.

    Woken by each process's pidfd as it exits, not by polling."""
    import psutil

    watches: list[tuple[psutil.Process, runner.ExitWatch]] = []
    try:
        for pid in pids:
            with contextlib.suppress(*procinfo.PROCESS_GONE):
                proc = psutil.Process(pid)
                watch = runner.ExitWatch(pid)
                if proc.is_running():  # the pidfd is that process's, not a reused pid's
                    watches.append((proc, watch))
                else:
                    watch.close()
        if watches:
            await asyncio.wait([w.exited for _p, w in watches], timeout=max(timeout, 0.0))
        return [p for p, w in watches if not w.exited.done()]
    finally:
        for _p, w in watches:
            w.close()


def _traversable(st: os.stat_result, user: AgentUser) -> bool:
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def prepare_socket_dir(d: Path, user: AgentUser) -> None:
    """The tmux socket's directory: a real directory, the agent's, 0700, every parent
    traversable by the agent (``SessionError`` says which is not, and what to do)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise SessionError(f"tmux socket directory {d} is not a directory",
                               f"remove {d} or set CODETAINER_TMUX_SOCKET")
        os.chown(d, user.uid, user.gid)
        os.chmod(d, 0o700)
        for parent in d.resolve().parents:
            pst = parent.stat()
            if not _traversable(pst, user):
                raise SessionError(
                    f"{user.name} (uid {user.uid}) cannot reach {d}: {parent} is mode "
                    f"{stat.S_IMODE(pst.st_mode):o}", f"chmod o+x {parent}")
    except OSError as exc:
        raise SessionError(f"cannot prepare tmux socket directory {d}: {exc.strerror}",
                           "check that the run directory is writable by the daemon") from None
