"""close_writer: the server side of a stream connection is freed at once, on every server
that uses it (control socket over Unix, the DNS hook over TCP)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from codetainer.streams import close_writer

from tests.gcprobe import connections_closed, transports_left_by


async def _echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    await close_writer(writer)


def _clients(family: int, address: str | tuple[str, int], n: int) -> None:
    """Plain blocking sockets: no asyncio transport on the client side to count."""
    for i in range(n):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(address)
            s.sendall(b"%d\n" % i)
            assert s.recv(64) == b"%d\n" % i


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_closed_server_connections_leave_no_cyclic_garbage(tmp_path: Path,
                                                                 kind: str) -> None:
    if kind == "unix":
        path = str(tmp_path / "s.sock")
        server = await asyncio.start_unix_server(_echo_once, path=path)
        family, address = socket.AF_UNIX, path
    else:
        server = await asyncio.start_server(_echo_once, "127.0.0.1", 0)
        family, address = socket.AF_INET, server.sockets[0].getsockname()
    try:
        await asyncio.to_thread(_clients, family, address, 5)  # warm up
        await connections_closed("_echo_once")
        transports = await transports_left_by(lambda: _clients(family, address, 40),
                                              "_echo_once")
        assert transports == []
    finally:
        server.close()
        await server.wait_closed()
