"""The one guard of every lifecycle: a transition table and the exception it raises.

Each lifecycle (a service: ``services/states.py``; the boot: ``boot/engine.py``; the
agent session: ``session/tmux.py``) is an enum of states with a table of the moves it
allows, and changes state in one ``change_state`` that goes through :func:`transition`.
Bottom layer: imports nothing of the package.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


class InvalidTransition(RuntimeError):
    """A state change the lifecycle's table does not allow: a bug, never ignored."""


def transition(table: Mapping[E, frozenset[E]], old: E, new: E, what: str) -> E:
    """Return ``new`` when ``table`` allows ``old -> new``, else raise
    :class:`InvalidTransition` whose message starts with ``what`` (``"boot state"``)."""
    if new not in table[old]:
        raise InvalidTransition(f"{what} {old.name} -> {new.name} is not allowed")
    return new
