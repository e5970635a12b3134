"""structlog set-up: JSON lines when stdout is not a TTY (what ``fly logs`` collects),
readable console lines on a TTY. Event names are stable; values are fields."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


#: the level in force; a processor reads it, so it can change at run time (SIGUSR2)
_threshold = {"level": logging.INFO}
_secrets: dict[str, str] = {}


#: structlog method name -> level (``exception`` logs at error, ``msg`` at info)
_METHOD_LEVELS = {**LEVELS, "warn": logging.WARNING, "exception": logging.ERROR,
                  "critical": logging.CRITICAL, "fatal": logging.CRITICAL}


def _filter(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _METHOD_LEVELS.get(method, logging.INFO) < _threshold["level"]:
        raise structlog.DropEvent
    return event_dict


REDACTED = "[redacted]"
#: values shorter than this are not redacted (they would mangle ordinary text)
MIN_REDACT_LEN = 6


def redact(text: str, secrets: Mapping[str, str]) -> str:
    """``text`` with every secret value replaced (for messages built from tool output)."""
    for value in sorted(set(secrets.values()), key=len, reverse=True):
        if len(value) >= MIN_REDACT_LEN:
            text = text.replace(value, REDACTED)
    return text


def _redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Defence in depth: no code path logs a secret, and this catches one that would."""
    if _secrets:
        for key, value in event_dict.items():
            if isinstance(value, str):
                event_dict[key] = redact(value, _secrets)
    return event_dict


def register_secrets(secrets: Mapping[str, str]) -> None:
    """Values that must never reach a log line (replaced by the redaction marker)."""
    _secrets.update(secrets)


def set_level(level: str) -> None:
    _threshold["level"] = LEVELS.get(level.lower(), logging.INFO)


def toggle_debug(configured: str) -> str:
    """SIGUSR2: debug on, or back to the configured level. Returns the level now in force."""
    if _threshold["level"] == logging.DEBUG:
        set_level(configured if configured.lower() != "debug" else "info")
    else:
        set_level("debug")
    return logging.getLevelName(_threshold["level"]).lower()


def configure(level: str = "info", fmt: str = "auto") -> None:
    tty = sys.stdout.isatty()
    set_level(level)
    renderer: structlog.typing.Processor
    if fmt == "console" or (fmt == "auto" and tty):
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            _filter,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
