"""Wire format of the control socket: newline-delimited JSON, versioned.

Request:  ``{"v": 1, "op": "status", "args": {...}}``
Reply:    ``{"v": 1, "ok": true, "result": {...}}``
Error:    ``{"v": 1, "ok": false, "error": {"code": "permission_denied", "message": "..."}}``
Streams (``events``, ``wait``) send ``{"v": 1, "event": {...}}`` lines, then one reply.

This module is imported by the CLI, so it must stay free of heavy imports.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the CLI's start-up)
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
DEFAULT_SOCKET = "/run/codetainer/control.sock"

# Error codes (stable; clients branch on them).
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
PERMISSION_DENIED = "permission_denied"
TOO_LARGE = "too_large"
TIMEOUT = "timeout"
BUSY = "busy"
NOT_FOUND = "not_found"
FAILED = "failed"
INTERNAL = "internal"


class RequestError(Exception):
    """A request answered with an error reply (``code``, ``message``), never a crash: a
    line ``parse_request`` refuses, or a handler refusing or failing the request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: The same class, by the name the wire-format checks were written with.
ProtocolError = RequestError


def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


def request(op: str, **args: Any) -> bytes:
    return encode({"v": VERSION, "op": op, "args": args})


def ok(result: Any) -> dict[str, Any]:
    return {"v": VERSION, "ok": True, "result": result}


def error(code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": {"code": code, "message": message}}


def event(ev: dict[str, Any]) -> dict[str, Any]:
    return {"v": VERSION, "event": ev}


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Validate one request line; raise RequestError with a message a person can act on."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(BAD_REQUEST, f"request is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(BAD_REQUEST, "request must be a JSON object with an 'op' field")
    v = obj.get("v", VERSION)
    if v != VERSION:
        raise RequestError(BAD_REQUEST, f"unsupported protocol version {v!r}; this daemon speaks {VERSION}")
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        raise RequestError(BAD_REQUEST, "request has no 'op' string")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise RequestError(BAD_REQUEST, "'args' must be a JSON object")
    return op, args
