"""Hand ``CLAUDE_PROMPT`` to the agent without leaving it lying around.

The prompt goes into a file readable only by the agent user (mode 0600, owned by it) in
the agent's private tmux directory. The agent pane runs a small wrapper::

    sh -c 'f=FILE; if [ -f "$f" ] && p=$(cat -- "$f"); then rm -f -- "$f";
           exec claude … "$p"; fi; rm -f -- "$f"; exec claude …'

so the file is gone the moment the agent has it, and a respawned agent starts without a
prompt (the prompt is a one-shot instruction, not a standing order).

Trade-off (documented in README): Claude Code takes the initial prompt of an interactive
session only as a command-line argument, so the prompt does end up in the ``claude``
process's argv (``/proc/PID/cmdline``), readable by processes in the container. It never
appears in the argv of tmux, of the daemon's subprocesses, in the tmux command that
creates the pane, in the pane's environment or in any log: only its SHA-256 is logged.
The alternative, typing it into the TUI with ``tmux send-keys`` once the agent is ready,
keeps it out of argv entirely but races the TUI's start-up and mangles multi-line
prompts, so it was rejected. The prompt is an instruction to the agent, which can read it
anyway; the aim is that it does not leak to operators' logs and outlive its use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
from collections.abc import Mapping

PROMPT_VAR = "CLAUDE_PROMPT"
PROMPT_FILE_NAME = "prompt"


def digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def find_prompt(*sources: Mapping[str, str] | None) -> str | None:
    """The first non-empty ``CLAUDE_PROMPT`` among ``sources`` (secrets before environ)."""
    for source in sources:
        if source and source.get(PROMPT_VAR):
            return source[PROMPT_VAR]
    return None


def write_prompt_file(path: str, prompt: str, uid: int, gid: int) -> None:
    """Create ``path`` (mode 0600, owned by ``uid``) holding ``prompt``.

    The directory belongs to the agent user, who could plant a symlink there, so the
    file is created with ``O_EXCL | O_NOFOLLOW`` after removing whatever was there
    (``unlink`` removes a link, never its target).
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
        data = prompt.encode()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


def remove_prompt_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def wrapper_script(agent_command: str, prompt_file: str) -> str:
    """The ``sh -c`` script that runs the agent, with the prompt if its file exists.

    ``agent_command`` is the operator's shell command line (``CODETAINER_AGENT_COMMAND``)
    and is used as shell text on purpose; the prompt is never part of the script.
    """
    f = shlex.quote(prompt_file)
    return (
        f"{_found_check(agent_command)}"
        f'f={f}; if [ -f "$f" ] && p=$(cat -- "$f"); then rm -f -- "$f"; '
        f'exec {agent_command} "$p"; fi; rm -f -- "$f"; exec {agent_command}'
    )


def _found_check(agent_command: str) -> str:
    """Shell text that says, in the pane, that the agent's program is missing.

    sh's own ``exec: claude: not found`` lands on the pane's first line, which tmux's
    "Pane is dead" line then scrolls away: the pane would show no reason at all. The
    message starts with an empty line so it stays on screen.
    """
    try:
        words = shlex.split(agent_command)
    except ValueError:
        return ""
    program = next((w for w in words if "=" not in w.split("/")[0]), None)
    if program is None or program in ("exec", "env", "command", "nice", "nohup"):
        return ""
    q = shlex.quote(program)
    return (f"command -v -- {q} >/dev/null 2>&1 || {{ printf '\\ncodetainer: %s: command "
            f"not found (CODETAINER_AGENT_COMMAND); install it or set the variable\\n' "
            f"{q} >&2; exit 127; }}; ")
