#!/usr/bin/python3 -IS
"""Claude Code status line: model, context-usage bar, percentage, tmux session name.

Claude Code runs this (``statusLine`` of type ``command``) with the session state as
JSON on stdin and shows the first line it prints. The fields used:

* ``model.display_name`` (``model.id`` as a fallback)
* ``context_window.used_percentage``: Claude Code's own figure, preferred
* ``context_window.current_usage`` (``input_tokens`` + ``cache_creation_input_tokens``
  + ``cache_read_input_tokens``) over ``context_window.context_window_size``, when the
  percentage is absent
* ``transcript_path``: older Claude Code versions send no ``context_window``; the
  last assistant message's ``usage`` in the transcript gives the same sum

Missing fields or input that is not JSON still give a line (``--%`` and an empty bar):
a status line that crashes shows nothing at all. Standard library only; it runs on
every refresh, so it starts with ``-I -S`` and does one quick tmux call at most.

Environment: CODETAINER_TMUX (tmux executable, default "tmux"); NO_COLOR disables colour.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

BAR_CELLS = 20
GREEN_MAX = 65.0
YELLOW_MAX = 85.0
DEFAULT_WINDOW = 200_000
TRANSCRIPT_TAIL_BYTES = 256 * 1024
MAX_INPUT_BYTES = 1 << 20

GREEN = "\033[32m"
YELLOW = "\033[33m"
RED = "\033[31m"
DIM = "\033[2m"
RESET = "\033[0m"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _get(data: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _usage_tokens(usage: object) -> float | None:
    if not isinstance(usage, dict):
        return None
    total = 0.0
    seen = False
    for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        n = _number(usage.get(key))
        if n is not None:
            total += n
            seen = True
    return total if seen else None


def _window_size(data: dict[str, Any]) -> float:
    size = _number(_get(data, "context_window", "context_window_size"))
    if size and size > 0:
        return size
    model_id = _get(data, "model", "id")
    if isinstance(model_id, str) and "[1m]" in model_id.lower():
        return 1_000_000.0
    return float(DEFAULT_WINDOW)


def _transcript_tokens(path: object) -> float | None:
    """Context tokens of the last assistant turn recorded in the transcript."""
    if not isinstance(path, str) or not path:
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            fh.seek(max(0, end - TRANSCRIPT_TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None
    for raw in reversed(tail.decode("utf-8", "replace").splitlines()):
        if '"usage"' not in raw:
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("isSidechain"):
            continue  # a subagent's usage is not this context
        tokens = _usage_tokens(_get(entry, "message", "usage"))
        if tokens is not None:
            return tokens
    return None


def context_percent(data: dict[str, Any]) -> float | None:
    """Percentage of the context window in use, or None when nothing says."""
    pct = _number(_get(data, "context_window", "used_percentage"))
    if pct is None:
        tokens = _usage_tokens(_get(data, "context_window", "current_usage"))
        if tokens is None:
            tokens = _transcript_tokens(data.get("transcript_path"))
        if tokens is None:
            return None
        pct = tokens * 100.0 / _window_size(data)
    return max(0.0, min(100.0, pct))


def model_name(data: dict[str, Any]) -> str:
    for keys in (("model", "display_name"), ("model", "id")):
        value = _get(data, *keys)
        if isinstance(value, str) and value.strip():
            return _printable(value.strip())[:40]
    return "Claude"


def _printable(text: str) -> str:
    # Escape sequences in a field must not reach the terminal.
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "", text)


def colour_for(pct: float) -> str:
    if pct <= GREEN_MAX:
        return GREEN
    if pct <= YELLOW_MAX:
        return YELLOW
    return RED


def bar(pct: float | None, colour: bool = True) -> str:
    if pct is None:
        return "░" * BAR_CELLS
    filled = min(BAR_CELLS, max(0, round(pct * BAR_CELLS / 100.0)))
    cells = "█" * filled + "░" * (BAR_CELLS - filled)
    return f"{colour_for(pct)}{cells}{RESET}" if colour else cells


def tmux_session_name(env: dict[str, str]) -> str | None:
    value = env.get("TMUX", "")
    parts = value.rsplit(",", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    pane = env.get("TMUX_PANE", "")
    target = pane if re.fullmatch(r"%[0-9]+", pane) else ("$" + parts[2])
    tmux = env.get("CODETAINER_TMUX") or "tmux"
    try:
        proc = subprocess.run(
            [tmux, "-S", parts[0], "display-message", "-p", "-t", target, "#{session_name}"],
            capture_output=True,
            timeout=1,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = _printable(proc.stdout.decode("utf-8", "replace").strip())
    return name if proc.returncode == 0 and name else None


def render(data: dict[str, Any] | None, env: dict[str, str]) -> str:
    colour = not env.get("NO_COLOR")
    data = data or {}
    pct = context_percent(data)
    pct_text = "--%" if pct is None else f"{pct:.0f}%"
    parts = [model_name(data), bar(pct, colour), pct_text]
    session = tmux_session_name(env)
    if session:
        parts.append(f"{DIM}{session}{RESET}" if colour else session)
    return " ".join(parts)


def parse(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def main() -> int:
    try:
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES)
    except OSError:
        data = b""
    # Bytes, not text: the bar's block characters must not depend on the locale.
    sys.stdout.buffer.write((render(parse(data), dict(os.environ)) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
