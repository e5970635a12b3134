"""Make text from the daemon safe to print on an operator's terminal.

Much of what ``status``, ``why`` and ``attach`` show comes from the agent: its process
names and command lines, the tmux session name (a hook renames it), the names it asked
the DNS server for. An escape sequence in any of them would reach root's terminal (set
the title, write the clipboard with OSC 52, move the cursor to forge a line), so every
control character but newline and tab is shown as a visible ``\\xNN`` escape. JSON output
needs none of this: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the CLI's start-up)
if TYPE_CHECKING:
    from typing import Any

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def inert_text(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def inert(value: Any) -> Any:
    """``value`` with every string (keys too) made inert, recursively."""
    if isinstance(value, str):
        return inert_text(value)
    if isinstance(value, dict):
        return {inert(k): inert(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [inert(v) for v in value]
    return value
