"""The control socket server.

Defences, each tested: request lines are capped (``MAX_REQUEST_BYTES``); a client must
send its request within ``idle_timeout``; a handler gets ``handler_timeout``; at most
``max_clients`` connections are served at once (the rest get ``busy``); a stream client
that stops reading is cut off when its queue fills or a write stalls. Privileged
operations check the peer's uid with ``SO_PEERCRED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from codetainer.control import protocol
from codetainer.control.protocol import RequestError
from codetainer.streams import close_writer

log = structlog.get_logger("codetainer.control")

# RequestError is protocol's, re-exported: handlers raise it from here.
__all__ = ["ControlServer", "Handler", "Peer", "Request", "RequestError", "Route", "Send",
           "StreamHandler", "peer_credentials"]


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass
class Request:
    op: str
    args: dict[str, Any]
    peer: Peer


Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Request], Awaitable[Any]]
StreamHandler = Callable[[Request, Send], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    handler: Handler | None
    stream_handler: StreamHandler | None
    privileged: bool


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class ControlServer:
    def __init__(
        self,
        path: str,
        *,
        max_clients: int = 512,
        evict_after: float = 0.5,
        idle_timeout: float = 10.0,
        handler_timeout: float = 30.0,
        write_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.max_clients = max_clients
        self.evict_after = evict_after
        self.idle_timeout = idle_timeout
        self.handler_timeout = handler_timeout
        self.write_timeout = write_timeout
        self.routes: dict[str, Route] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        # Clients that connected but have not sent a request yet, oldest first.
        self._idle: dict[asyncio.Task[None], float] = {}
        self.evicted_idle = 0

    def register(self, op: str, handler: Handler, *, privileged: bool = False) -> None:
        self.routes[op] = Route(handler, None, privileged)

    def register_stream(self, op: str, handler: StreamHandler, *, privileged: bool = False) -> None:
        self.routes[op] = Route(None, handler, privileged)

    async def start(self) -> None:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Only replace a stale socket, never something else an operator put there.
        if path.is_socket():
            path.unlink()
        self._server = await asyncio.start_unix_server(
            self._on_client, path=self.path, limit=protocol.MAX_REQUEST_BYTES, backlog=1024
        )
        # Anyone local may read; privileged ops are gated per request on SO_PEERCRED.
        os.chmod(self.path, 0o666)  # noqa: S103
        log.info("control_listening", path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            if Path(self.path).is_socket():
                os.unlink(self.path)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        oldest = min(self._idle, key=self._idle.__getitem__) if self._idle else None
        if (len(self._clients) >= self.max_clients and oldest is not None
                and time.monotonic() - self._idle[oldest] > self.evict_after):
            # Full: make room by dropping the oldest client that has said nothing for a
            # while, so a crowd of silent connections can never lock out `status`.
            del self._idle[oldest]
            oldest.cancel()
            self.evicted_idle += 1
        elif len(self._clients) >= self.max_clients:
            with contextlib.suppress(Exception):
                writer.write(protocol.encode(protocol.error(
                    protocol.BUSY, "too many control connections; try again shortly")))
                await asyncio.wait_for(writer.drain(), 1.0)
            await close_writer(writer)
            return
        self._clients.add(task)
        self._idle[task] = time.monotonic()
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, BrokenPipeError):
            pass
        except Exception:
            log.exception("control_client_crash")
        except asyncio.CancelledError:
            if self._server is None or not self._server.is_serving():
                raise
            # evicted to make room: tell the client why, then let the task end
            with contextlib.suppress(Exception):
                writer.write(protocol.encode(protocol.error(
                    protocol.BUSY, "closed to make room for other control clients: send "
                    "your request right after connecting")))
        finally:
            self._clients.discard(task)
            self._idle.pop(task, None)
            await close_writer(writer)

    async def _write(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(protocol.encode(msg))
        if writer.transport.get_write_buffer_size():  # only a slow reader makes us wait
            async with asyncio.timeout(self.write_timeout):
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else Peer(0, -1, -1)
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):  # no extra task per request
                    line = await reader.readline()
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await self._write(writer, protocol.error(
                        protocol.TIMEOUT, f"no request within {self.idle_timeout:g}s; closing"))
                return
            except (ValueError, asyncio.LimitOverrunError):
                await self._write(writer, protocol.error(
                    protocol.TOO_LARGE,
                    f"request line exceeds {protocol.MAX_REQUEST_BYTES} bytes; closing"))
                return
            if not line:
                return
            if not line.strip():
                continue
            self._idle.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            keep_open = await self._dispatch(line, peer, writer)
            if not keep_open:
                return

    async def _dispatch(self, line: bytes, peer: Peer, writer: asyncio.StreamWriter) -> bool:
        try:
            op, args = protocol.parse_request(line)
        except RequestError as exc:
            await self._write(writer, protocol.error(exc.code, exc.message))
            return True
        route = self.routes.get(op)
        if route is None:
            known = ", ".join(sorted(self.routes))
            await self._write(writer, protocol.error(
                protocol.UNKNOWN_OP, f"unknown op {op!r}; known ops: {known}"))
            return True
        if route.privileged and not peer.is_root:
            log.warning("control_denied", op=op, uid=peer.uid, pid=peer.pid)
            await self._write(writer, protocol.error(
                protocol.PERMISSION_DENIED,
                f"permission denied: {op!r} requires root (your uid is {peer.uid})"))
            return True
        req = Request(op, args, peer)
        if route.privileged:
            log.info("control_request", op=op, uid=peer.uid, pid=peer.pid)
        try:
            if route.handler is not None:
                async with asyncio.timeout(self.handler_timeout):
                    result = await route.handler(req)
            else:
                assert route.stream_handler is not None

                async def send(ev: dict[str, Any]) -> None:
                    await self._write(writer, protocol.event(ev))

                result = await route.stream_handler(req, send)
        except RequestError as exc:
            await self._write(writer, protocol.error(exc.code, exc.message))
            return True
        except TimeoutError:
            await self._write(writer, protocol.error(
                protocol.TIMEOUT, f"{op!r} did not finish within {self.handler_timeout:g}s"))
            return False
        except (ConnectionError, BrokenPipeError):
            return False
        except Exception as exc:
            log.exception("control_handler_crash", op=op)
            await self._write(writer, protocol.error(
                protocol.INTERNAL, f"internal error in {op!r}: {type(exc).__name__}"))
            return True
        try:
            await self._write(writer, protocol.ok(result))
        except TypeError:
            await self._write(writer, protocol.error(protocol.INTERNAL, "unserialisable reply"))
        return True
