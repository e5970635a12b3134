#!/usr/bin/python3 -IS
"""Claude Code Stop hook: give the agent's tmux session a short name for its work.

Claude Code runs this after every response, with the hook input as JSON on stdin
(``session_id``, ``transcript_path``, ``cwd``, ``hook_event_name``, ``stop_hook_active``).
Once per Claude session id it asks a small model, through ``claude -p --model haiku``,
for a 2-4 word kebab-case name of the work, and renames the tmux session it runs in.

Properties the tests rely on:

* The hook never delays the agent: all slow work happens in a forked child that has
  let go of Claude Code's pipes; the hook itself returns at once with exit 0.
* The namer's own ``claude -p`` call runs with ``CODETAINER_NAMER=1`` in its
  environment; that call's Stop hook sees the guard and does nothing (no recursion).
* Success is recorded per session id (``<state>/<id>.name``); a failure records
  nothing but an attempt count, so a later response retries, up to ``MAX_ATTEMPTS``.
* Session ids come from outside: anything but ``[A-Za-z0-9_-]`` is replaced by a
  hash before the id becomes part of a path.

Standard library only, and no imports beyond what ``-I -S`` startup needs.

Environment:
  CODETAINER_NAMER          guard; when "1" the hook exits at once
  CODETAINER_NAMER_STATE    state directory (default ~/.claude/codetainer-namer)
  CODETAINER_CLAUDE_BIN     the claude executable (default "claude")
  CODETAINER_TMUX           the tmux executable (default "tmux")
  CODETAINER_NAMER_TIMEOUT  seconds the model call may take (default 60)
  CODETAINER_NAMER_FOREGROUND  when "1", do the work without forking (debugging)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

GUARD_ENV = "CODETAINER_NAMER"
STATE_ENV = "CODETAINER_NAMER_STATE"
#: codetainer.boot.credentials.CLAUDE_TOKEN_FILE, under the agent's home
TOKEN_FILE = (".config", "codetainer", "claude-oauth-token")
TOKEN_FD_ENV = "CLAUDE_CODE_OAUTH_TOKEN_FILE_DESCRIPTOR"
CLAUDE_ENV = "CODETAINER_CLAUDE_BIN"
TMUX_ENV = "CODETAINER_TMUX"
TIMEOUT_ENV = "CODETAINER_NAMER_TIMEOUT"
FOREGROUND_ENV = "CODETAINER_NAMER_FOREGROUND"

MAX_INPUT_BYTES = 1 << 20
MAX_ATTEMPTS = 5
MAX_NAME_LEN = 50
MAX_WORDS = 4
CONTEXT_CHARS = 2000
TRANSCRIPT_HEAD_BYTES = 512 * 1024

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NON_NAME = re.compile(r"[^a-z0-9]+")

PROMPT = (
    "Name this coding session. Reply with only a 2-4 word kebab-case name "
    "(lower-case letters, digits and hyphens, for example fix-login-redirect) "
    "that says what the work is about. No other text.\n\n"
    "The session so far:\n{context}"
)


# -- pure helpers (unit-tested) ------------------------------------------------------


def safe_session_id(raw: object) -> str | None:
    """A file-name-safe form of a Claude session id, or None if there is none.

    Ids that are already safe are kept (they are UUIDs in practice); anything else,
    such as ``../../etc/x``, becomes a hash so that it can never name another path.
    """
    if not isinstance(raw, str) or not raw:
        return None
    if _SAFE_ID.fullmatch(raw):
        return raw
    return "h-" + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _kebab(text: str) -> str:
    # "Réparer l'accès" -> "reparer-l-acces", not "r-parer-l-acc-s"
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = [w for w in _NON_NAME.sub(" ", text.lower()).split() if w]
    name = "-".join(words[:MAX_WORDS])
    while len(name) > MAX_NAME_LEN and "-" in name:
        name = name.rsplit("-", 1)[0]
    return name[:MAX_NAME_LEN].strip("-")


def sanitize_name(answer: str) -> str | None:
    """Turn a model's free-text answer into a tmux-safe kebab-case name.

    Models wrap answers in prose, quotes, backticks or markdown; prefer a line that
    already is 2-4 kebab words, otherwise kebab-case the last non-empty line.
    Result: ``[a-z0-9-]``, no leading/trailing/double dashes, at most 4 words and
    50 characters. None when nothing usable is left.
    """
    lines = [ln.strip() for ln in answer.splitlines() if ln.strip()]
    if not lines:
        return None
    for line in reversed(lines):
        ascii_line = unicodedata.normalize("NFKD", line).encode("ascii", "ignore").decode()
        for token in reversed(re.findall(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)+", ascii_line)):
            if re.search(r"[A-Za-z]", token):
                return _kebab(token) or None
    last = lines[-1]
    if ":" in last and last.rsplit(":", 1)[1].strip():
        last = last.rsplit(":", 1)[1]  # "Name: Fix login" -> "Fix login"
    return _kebab(last) or None


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                text = block.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return ""


def transcript_context(path: object, limit: int = CONTEXT_CHARS) -> str:
    """The first user and assistant text of a transcript (JSONL), for the prompt."""
    if not isinstance(path, str) or not path:
        return ""
    try:
        with open(path, "rb") as fh:
            head = fh.read(TRANSCRIPT_HEAD_BYTES)
    except OSError:
        return ""
    pieces: list[str] = []
    seen = {"user": 0, "assistant": 0}
    for raw in head.decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("isMeta"):
            continue
        message = entry.get("message")
        role = message.get("role") if isinstance(message, dict) else None
        if role not in seen or seen[role] >= 2:
            continue
        text = _text_of(message.get("content") if isinstance(message, dict) else None)
        text = text.strip()
        if not text or text.startswith("<"):
            # Command echoes and tool plumbing (<command-name>, <local-command-stdout>)
            # say nothing about the work.
            continue
        seen[role] += 1
        pieces.append(f"{role}: {text}")
        if sum(len(p) for p in pieces) >= limit:
            break
    return "\n".join(pieces)[:limit]


def parse_hook_input(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def tmux_location(env: dict[str, str]) -> tuple[str, str] | None:
    """(socket path, target) of the tmux pane this hook runs in, from $TMUX/$TMUX_PANE.

    $TMUX is ``<socket>,<server pid>,<session index>``; the pane id is the most exact
    target, the session index the fallback.
    """
    value = env.get("TMUX", "")
    parts = value.rsplit(",", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    pane = env.get("TMUX_PANE", "")
    if re.fullmatch(r"%[0-9]+", pane):
        return parts[0], pane
    if parts[2].isdigit():
        return parts[0], "$" + parts[2]
    return None


# -- state ---------------------------------------------------------------------------


class State:
    """Per-session-id records in one directory: ``<id>.name`` (done), ``<id>.attempts``."""

    def __init__(self, directory: Path, sid: str) -> None:
        self.directory = directory
        self.done = directory / f"{sid}.name"
        self.attempts = directory / f"{sid}.attempts"
        self.lock = directory / f"{sid}.lock"
        self.log = directory / "namer.log"

    def ensure(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def is_done(self) -> bool:
        return self.done.exists()

    def attempt_count(self) -> int:
        try:
            return int(self.attempts.read_text().strip() or "0")
        except (OSError, ValueError):
            return 0

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def record_attempt(self) -> None:
        self._write(self.attempts, f"{self.attempt_count() + 1}\n")

    def record_done(self, name: str) -> None:
        self._write(self.done, name + "\n")

    def note(self, event: str, **fields: object) -> None:
        """One JSON line per outcome; the hook has no other place to say what happened."""
        line = json.dumps({"ts": round(time.time(), 3), "event": event, **fields})
        with contextlib.suppress(OSError), open(self.log, "a") as fh:
            fh.write(line + "\n")


def state_dir(env: dict[str, str]) -> Path:
    override = env.get(STATE_ENV)
    if override:
        return Path(override)
    return Path(env.get("HOME") or os.path.expanduser("~")) / ".claude" / "codetainer-namer"


# -- the work ------------------------------------------------------------------------


def ask_model(context: str, env: dict[str, str], cwd: Path) -> str | None:
    claude = env.get(CLAUDE_ENV) or "claude"
    try:
        timeout = float(env.get(TIMEOUT_ENV) or "60")
    except ValueError:
        timeout = 60.0
    child_env = dict(env)
    child_env[GUARD_ENV] = "1"
    token_fd = None
    if not child_env.get("CLAUDE_CODE_OAUTH_TOKEN"):
        # Claude Code strips its token from the environment of the hooks it runs: the
        # daemon leaves it in a 0600 file, handed over on a descriptor, not in the env.
        token_fd = open_token(env)
        if token_fd is not None:
            child_env[TOKEN_FD_ENV] = str(token_fd)
    try:
        proc = subprocess.run(
            [claude, "-p", "--model", "haiku", PROMPT.format(context=context)],
            env=child_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            pass_fds=(token_fd,) if token_fd is not None else (),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        if token_fd is not None:
            os.close(token_fd)
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", "replace")


def open_token(env: dict[str, str]) -> int | None:
    """A descriptor on the Claude Code token file the daemon writes, or None."""
    path = Path(env.get("HOME") or os.path.expanduser("~")).joinpath(*TOKEN_FILE)
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


def rename_session(name: str, env: dict[str, str]) -> str | None:
    """Rename the tmux session this hook runs in; returns the name used, or None.

    A name already taken by another session gets a numeric suffix.
    """
    where = tmux_location(env)
    if where is None:
        return None
    socket, target = where
    tmux = env.get(TMUX_ENV) or "tmux"
    try:
        found = subprocess.run(
            [tmux, "-S", socket, "display-message", "-p", "-t", target, "#{session_id}"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    session = found.stdout.decode("utf-8", "replace").strip()
    if found.returncode != 0 or not re.fullmatch(r"\$[0-9]+", session):
        return None
    for n in range(1, 10):
        candidate = name if n == 1 else f"{name[: MAX_NAME_LEN - 2]}-{n}"
        try:
            done = subprocess.run(
                [tmux, "-S", socket, "rename-session", "-t", session, candidate],
                capture_output=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode == 0:
            return candidate
        if b"duplicate" not in done.stderr:
            return None
    return None


def name_session(hook: dict[str, Any], state: State, env: dict[str, str]) -> int:
    """The slow part: ask the model, rename, record. Returns an exit status."""
    state.ensure()
    with open(state.lock, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # another Stop of this session is naming it already
        if state.is_done() or state.attempt_count() >= MAX_ATTEMPTS:
            return 0
        state.record_attempt()
        context = transcript_context(hook.get("transcript_path"))
        if not context:
            state.note("namer_no_context")
            return 1
        answer = ask_model(context, env, state.directory)
        if answer is None:
            state.note("namer_model_failed")
            return 1
        name = sanitize_name(answer)
        if name is None:
            state.note("namer_answer_unusable")
            return 1
        used = rename_session(name, env)
        if used is None:
            state.note("namer_rename_failed", name=name)
            return 1
        state.record_done(used)
        state.note("namer_renamed", name=used)
        return 0


def _detach() -> bool:
    """Fork; the parent returns True at once, the child carries on detached.

    The child must let go of stdin/stdout/stderr: Claude Code waits for EOF on the
    hook's pipes, so a child that kept them open would delay the agent after all.
    """
    if os.fork() > 0:
        return True
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    return False


def main() -> int:
    env = dict(os.environ)
    if env.get(GUARD_ENV) == "1":
        return 0
    try:
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES)
    except OSError:
        return 0
    hook = parse_hook_input(data)
    if hook is None:
        return 0
    sid = safe_session_id(hook.get("session_id"))
    if sid is None or tmux_location(env) is None:
        return 0
    state = State(state_dir(env), sid)
    if state.is_done() or state.attempt_count() >= MAX_ATTEMPTS:
        return 0
    if env.get(FOREGROUND_ENV) == "1":
        return name_session(hook, state, env)
    if _detach():
        return 0
    try:
        name_session(hook, state, env)
    except Exception as exc:  # the detached child has nobody else to report to
        state.note("namer_crashed", error=type(exc).__name__)
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
