"""Synchronous control-socket client for the CLI (standard library only: fast start)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

from codetainer.control import protocol

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the CLI's start-up)
if TYPE_CHECKING:
    from typing import Any


class DaemonUnreachable(Exception):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"cannot reach codetainerd at {path}: {why}")
        self.path = path
        self.why = why


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("CODETAINER_SOCKET") or protocol.DEFAULT_SOCKET


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = 5.0) -> None:
        self.path = socket_path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(self.path, "no socket there") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnreachable(self.path, "connection refused (daemon not running)") from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(self.path, "permission denied on the socket") from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(self.path, exc.strerror or str(exc)) from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _lines(self) -> Iterator[dict[str, Any]]:
        assert self._sock is not None
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise DaemonUnreachable(self.path, "the daemon did not answer in time") from None
            if not chunk:
                raise DaemonUnreachable(self.path, "the daemon closed the connection")
            self._buf += chunk

    def stream(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send one request; yield event dicts, then return the final result.

        The final reply is yielded as ``{"__result__": result}`` so callers can iterate.
        """
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.sendall(protocol.request(op, **args))
        for msg in self._lines():
            if "event" in msg:
                yield msg["event"]
                continue
            if msg.get("ok"):
                yield {"__result__": msg.get("result")}
                return
            err = msg.get("error") or {}
            raise RequestFailed(str(err.get("code", "error")), str(err.get("message", msg)))

    def call(self, op: str, **args: Any) -> Any:
        result: Any = None
        for msg in self.stream(op, **args):
            if "__result__" in msg:
                result = msg["__result__"]
        return result


def call(op: str, path: str | None = None, timeout: float | None = 5.0, **args: Any) -> Any:
    with Client(path, timeout) as c:
        return c.call(op, **args)
