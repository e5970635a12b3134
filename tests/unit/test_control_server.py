"""The control socket against hostile and broken clients (real Unix sockets, in-process daemon)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from codetainer.boot.engine import Step
from codetainer.control import protocol
from codetainer.daemon import Daemon
from codetainer.settings import Settings


@pytest.fixture
def daemon(idle_daemon: Daemon) -> Daemon:
    idle_daemon.control.idle_timeout = 0.5  # read at each connection's wait
    return idle_daemon


async def roundtrip(path: str, payload: bytes, timeout: float = 5.0) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    await writer.drain()
    out = []
    line = await asyncio.wait_for(reader.readline(), timeout)
    if line:
        out.append(json.loads(line))
    writer.close()
    return out


async def status_latency(path: str) -> float:
    t0 = time.perf_counter()
    reply = await roundtrip(path, protocol.request("status"))
    assert reply[0]["ok"] is True
    return time.perf_counter() - t0


#: "status answerable within milliseconds": bounds for a noisy 2-core machine
MEDIAN_S, MAX_S = 0.05, 0.2


def assert_fast(latencies: list[float]) -> None:
    assert statistics.median(latencies) < MEDIAN_S, latencies
    assert max(latencies) < MAX_S, latencies


async def assert_status_fast(path: str, probes: int = 7) -> None:
    assert_fast([await status_latency(path) for _ in range(probes)])


async def until(pred: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def test_status_reply_shape(daemon: Daemon) -> None:
    [reply] = await roundtrip(daemon.settings.socket, protocol.request("status"))
    assert reply["v"] == 1 and reply["ok"] is True
    result = reply["result"]
    assert isinstance(result, dict)
    assert set(result) >= {"state", "steps", "services", "daemon"}
    assert [s["name"] for s in result["services"]] == ["idle"]
    assert set(result["services"][0]) >= {"name", "state", "pid", "restarts", "last_exit"}


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json\n", "bad_request"),
        (b"[1,2,3]\n", "bad_request"),
        (b'{"args": {}}\n', "bad_request"),
        (b'{"op": "frobnicate"}\n', "unknown_op"),
        (b'{"op": "status", "v": 99}\n', "bad_request"),
        (b'{"op": "status", "args": []}\n', "bad_request"),
        (b"\xff\xfe\n", "bad_request"),
        (b'{"op": "restart", "args": {}}\n', "bad_request"),
        (b'{"op": "restart", "args": {"name": "nope"}}\n', "not_found"),
    ],
)
async def test_bad_requests_get_clear_errors(daemon: Daemon, payload: bytes, code: str) -> None:
    [reply] = await roundtrip(daemon.settings.socket, payload)
    assert reply["ok"] is False
    err = reply["error"]
    assert isinstance(err, dict)
    assert err["code"] == code
    assert err["message"]
    await assert_status_fast(daemon.settings.socket)


async def test_ten_megabyte_line_is_refused(daemon: Daemon) -> None:
    # A raw socket, not asyncio streams: a stream transport that fails to write drops what it
    # had not read yet, which would hide the reply. The kernel keeps the reply queued for us
    # even after the daemon closed (it was sent first), so it must always be there.
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, daemon.settings.socket)
        # The daemon reads 64 KiB, answers too_large and closes: the rest of our write
        # fails (a daemon that went on reading 10 MB would let it succeed).
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            await asyncio.wait_for(loop.sock_sendall(sock, b"x" * (10 * 1024 * 1024) + b"\n"), 10)
        data = b""
        while not data.endswith(b"\n"):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert chunk, f"closed without a too_large reply; got {data!r}"
            data += chunk
        reply = json.loads(data)
        assert reply["ok"] is False and reply["error"]["code"] == "too_large", reply
        assert str(protocol.MAX_REQUEST_BYTES) in reply["error"]["message"]
        try:
            rest = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        except ConnectionResetError:
            rest = b""
        assert rest == b""  # and the connection is closed
    finally:
        sock.close()
    await assert_status_fast(daemon.settings.socket)
    for _ in range(100):  # and the daemon let go of every connection (the probes' too)
        if not daemon.control._clients:
            break
        await asyncio.sleep(0.01)
    assert not daemon.control._clients


async def test_silent_client_is_disconnected(daemon: Daemon) -> None:
    reader, writer = await asyncio.open_unix_connection(daemon.settings.socket)
    t0 = time.monotonic()
    line = await asyncio.wait_for(reader.readline(), 5)
    assert json.loads(line)["error"]["code"] == "timeout"
    assert await reader.read() == b""  # closed
    assert time.monotonic() - t0 < 2
    writer.close()


async def test_five_hundred_clients_at_once(daemon: Daemon) -> None:
    ctl = daemon.control
    ctl.idle_timeout, ctl.max_clients, ctl.evict_after = 10.0, 256, 0.1
    conns = [await asyncio.open_unix_connection(daemon.settings.socket) for _ in range(500)]

    def full_and_evictable() -> bool:
        # what lets the next client in: the cap reached, its oldest silent client evictable
        return (len(ctl._clients) >= ctl.max_clients and bool(ctl._idle)
                and time.monotonic() - min(ctl._idle.values()) > ctl.evict_after)

    await until(full_and_evictable, "the server full of silent clients, the oldest evictable")
    # With 500 idle connections open, status still answers quickly (busy or served).
    await assert_status_fast(daemon.settings.socket)
    served = closed = 0
    for _reader, writer in conns:
        writer.write(protocol.request("ping"))
    for reader, _writer in conns:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
        except ConnectionError:
            line = b""
        if not line:
            closed += 1  # evicted while silent, to make room
            continue
        msg = json.loads(line)
        if msg["ok"] is True:
            served += 1
        else:
            assert msg["error"]["code"] in ("busy", "timeout")
            closed += 1
    assert served + closed == 500
    assert served >= 200  # the ones still connected were all answered
    for _reader, writer in conns:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert daemon.control.evicted_idle > 0  # the cap really applied


async def test_stalled_event_reader_is_cut_off(daemon: Daemon) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(daemon.settings.socket)
    sock.sendall(protocol.request("events"))
    await until(lambda: daemon.events.subscribers, "the events subscription")
    assert daemon.events.subscribers == 1
    big = "x" * 2000
    latencies = []
    for i in range(5000):  # far more than the subscriber queue holds
        daemon.events.publish("test.flood", i=i, pad=big)
        if i % 100 == 0:
            await asyncio.sleep(0)
            latencies.append(await status_latency(daemon.settings.socket))
    assert_fast(latencies)
    for _ in range(100):
        if daemon.events.subscribers == 0:
            break
        await asyncio.sleep(0.05)
    assert daemon.events.subscribers == 0
    sock.close()


async def test_privileged_op_accepted_for_root(daemon: Daemon) -> None:
    [reply] = await roundtrip(daemon.settings.socket,
                              protocol.request("restart", name="idle"))
    assert reply["ok"] is True, reply
    result = reply["result"]
    assert isinstance(result, dict) and result["state"] == "RUNNING"


async def test_wait_streams_boot_and_returns_outcome(tmp_path: Path) -> None:
    conf = tmp_path / "s.conf"
    conf.write_text("[supervisord]\n")
    settings = Settings(socket=str(tmp_path / "c.sock"), services=str(conf))

    async def slow(ctx: object) -> str:
        await asyncio.sleep(0.3)
        return "done"

    d = Daemon(settings, [Step("slow", slow, timeout=5)], set())
    await d.startup()
    boot = asyncio.create_task(d.boot())
    reader, writer = await asyncio.open_unix_connection(settings.socket)
    writer.write(protocol.request("wait"))
    msgs = []
    while True:
        msg = json.loads(await asyncio.wait_for(reader.readline(), 5))
        msgs.append(msg)
        if "ok" in msg:
            break
    await boot
    writer.close()
    await d.control.close()
    events = [m["event"] for m in msgs if "event" in m]
    assert any(e["event"] == "boot.step" and e["state"] == "OK" and e["name"] == "slow"
               for e in events)
    assert msgs[-1]["result"]["state"] == "READY"


async def test_closed_connections_leave_no_cyclic_garbage(daemon: Daemon) -> None:
    """Each status connection is freed by reference counting, not left to the collector
    (3.11's socket transport keeps a cycle; streams.close_writer breaks it), so a crowd of
    status clients never builds up a full-collection stall."""
    from codetainer.control.client import Client

    from tests.gcprobe import connections_closed, transports_left_by

    def fifty() -> None:  # a plain-socket client: no asyncio transport on this side
        for _ in range(50):
            with Client(daemon.settings.socket, timeout=5) as c:
                c.call("status")

    await asyncio.to_thread(fifty)  # warm up: lazy imports, caches
    await connections_closed("ControlServer._on_client")
    transports = await transports_left_by(fifty, "ControlServer._on_client")
    assert transports == []


def test_settle_heap_collects_then_freezes_and_times_full_collections() -> None:
    """After boot the daemon freezes its heap so full collections stop walking it; the
    boot's garbage is collected first, never frozen (a subprocess: this one's heap stays
    as it is)."""
    import subprocess
    import sys

    code = (
        "import gc, weakref\n"
        "from codetainer.heap import settle_heap\n"
        "class C: pass\n"
        "a = C(); a.self = a; r = weakref.ref(a); del a\n"
        "gc.disable()\n"  # only settle_heap may collect it
        "settle_heap()\n"
        "assert r() is None, 'boot garbage was frozen, not collected'\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        # from then on every full collection is counted and timed, the others are not
        "from codetainer.heap import HEAP as F\n"
        "gc.collect(0); gc.collect(1)\n"
        "assert F.status()['full_collections'] == 0, F.status()\n"
        "alive = [{} for _ in range(200_000)]\n"  # new, unfrozen: a full GC walks them
        "gc.collect(); gc.collect()\n"
        "st = F.status()\n"
        "assert st['full_collections'] == 2 and st['longest_full_collection_ms'] > 0, st\n"
        "assert st['frozen_objects'] == gc.get_freeze_count(), st\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
