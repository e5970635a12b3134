"""The attach file: the agent's session as ``codetainer attach``'s fast path reads it.

``codetainer`` is a POSIX sh front (``daemon/scripts/codetainer``): with the session up,
root's ``codetainer attach`` is a few execs of small programs and no interpreter, so it
costs little more than a bare ``tmux attach`` (bench/bench_fastpaths.py). What it needs
is what the daemon's ``session`` reply would give, already rendered: while the session
runs, the daemon keeps this file next to its control socket (``session.attach``), written
atomically, root's alone (0600), removed the moment the session stops, fails or is being
recreated. The front sources it (``.`` reads a file in blocks, ``read`` a byte at a
time); every value is shell-quoted, nothing else is in it::

    # codetainer-attach: ...
    ct_attach=1
    ct_home=HOME          the agent's home (the client's $HOME)
    ct_command=SCRIPT     the agent's exec chain (boot/chain.py, ``agent_script``) around
                          ``tmux -u -S SOCK attach-session -t ID ; select-pane -t PANE``,
                          for ``script -c`` (whose shell runs the chain's prologue)

The front trusts the file only when it is a regular file owned by the uid running it
(root) in a directory owned by that uid: the agent cannot create a root-owned file, and
the chain it names drops to the agent (no_new_privs, empty bounding set, the seccomp
filter) before tmux runs, exactly as :func:`codetainer.cli.attach.dropped_attach` does
from the ``session`` reply (both render it with :mod:`codetainer.boot.chain`). Anything
else (no file, a stale one whose server is gone, an unknown terminal) goes to the Python
CLI, which explains or waits.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from codetainer.boot import chain
from codetainer.boot.seccomp import SeccompUnavailable, filter_hex

if TYPE_CHECKING:
    from codetainer.boot.privileges import AgentUser, ExecLimits

log = structlog.get_logger("codetainer.session")

FILE_NAME = "session.attach"
HEADER = "# codetainer-attach: the agent's session for codetainer's sh front; by codetainerd"


def path_for(control_socket: str) -> str:
    """Where the front looks: beside the control socket it was given."""
    return os.path.join(os.path.dirname(control_socket) or ".", FILE_NAME)


def render(*, uid: int, gid: int, home: str, tmux_argv: Sequence[str], filter_hex: str,
           oom_score_adj: int, nice: int, nproc: int, cgroup_procs: Sequence[str]) -> str:
    """The file's text (module docstring)."""
    script = chain.agent_script(uid, gid, tmux_argv, filter_hex=filter_hex,
                                oom_score_adj=oom_score_adj, nice=nice, nproc=nproc,
                                cgroup_procs=cgroup_procs)
    return (f"{HEADER}\nct_attach=1\nct_home={shlex.quote(home)}\n"
            f"ct_command={shlex.quote(script)}\n")


def write(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a reader sees the old file or the new
    one), root's alone. Raises OSError."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sync(path: str, user: AgentUser | None, *, limits: ExecLimits, tmux: str, socket: str,
         session_id: str, agent_pane: str | None) -> None:
    """Remove the file, then, when ``user`` is given (the session is up), write it anew
    for that session. A failure to write leaves no file (attach takes the slow path)."""
    if user is None:
        remove(path)
        return
    try:
        write(path, render(
            uid=user.uid, gid=user.gid, home=user.home, filter_hex=filter_hex(),
            tmux_argv=chain.tmux_attach_argv(tmux, socket, session_id, agent_pane),
            oom_score_adj=limits.oom_score_adj, nice=limits.nice, nproc=limits.nproc,
            cgroup_procs=limits.cgroup_procs))
    except (OSError, ValueError, SeccompUnavailable) as exc:
        log.warning("attach_file_failed", path=path, why=str(exc))
        remove(path)
