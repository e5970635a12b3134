"""What a status request costs: the agent's figures sampled at most once a second, and
``status --check`` (``status`` with ``brief``) as cheap as ``ping``, yet saying what
``status`` says about the state and its reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from codetainer.control import protocol
from codetainer.daemon import Daemon
from codetainer.network.allowlist import Allowlist
from codetainer.session.usage import SAMPLE_MAX_AGE, UsageCache

from tests.unit.test_control_server import roundtrip


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_usage_is_sampled_at_most_once_per_max_age(tmp_path: Path) -> None:
    clock = Clock()
    cache = UsageCache(clock=clock)
    asked: list[int] = []

    def owned(pid: int) -> bool:
        asked.append(pid)
        return True

    me = os.getpid()
    for _ in range(100):
        tree, mounts = cache.sample(me, [str(tmp_path)], owned)
        clock.now += SAMPLE_MAX_AGE / 200
    assert cache.samples == 1 and asked == [me], "a crowd of requests costs one sample"
    assert tree is not None and tree["pid"] == me and tree["rss_bytes"] > 0
    assert [m["path"] for m in mounts] == [str(tmp_path)]
    tree["rss_bytes"] = -1  # a caller's copy: the cache is not changed through it
    assert cache.sample(me, [str(tmp_path)], owned)[0]["rss_bytes"] > 0  # type: ignore[index]
    clock.now += SAMPLE_MAX_AGE
    cache.sample(me, [str(tmp_path)], owned)
    assert cache.samples == 2, "an old sample is taken again"
    cache.sample(os.getppid(), [str(tmp_path)], owned)
    assert cache.samples == 3, "another agent pid is sampled at once"
    assert cache.sample(None, [str(tmp_path)], owned)[0] is None and cache.samples == 4
    assert cache.sample(me, [], lambda _pid: False)[0] is None, "not the agent's: not sampled"


@pytest.fixture
def daemon(idle_daemon: Daemon) -> Daemon:
    return idle_daemon


async def call(d: Daemon, op: str, **args: Any) -> dict[str, Any]:
    [reply] = await roundtrip(d.settings.socket, protocol.request(op, **args))
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["result"]
    return result


async def test_brief_status_is_state_and_reasons_only_without_building_sections(
        daemon: Daemon) -> None:
    built: list[str] = []

    def section(name: str, degraded: str | None) -> Any:
        def status() -> dict[str, Any]:
            built.append(name)
            return {"degraded": degraded}
        return status

    daemon.extra_status["probed"] = section("probed", "its section says so")
    daemon.degraded_probes["probed"] = lambda: "its probe says so"
    daemon.extra_status["unprobed"] = section("unprobed", "no probe: its section is asked")
    network, limits = daemon.extra_status["network"], daemon.extra_status["limits"]
    daemon.extra_status["network"] = lambda: built.append("network") or network()
    daemon.extra_status["limits"] = lambda: built.append("limits") or limits()
    brief = await call(daemon, "status", brief=True)
    assert built == ["unprobed"], "brief status built a section that has a probe"
    assert set(brief) == {"state", "reasons"}
    assert brief["reasons"] == ["probed: its probe says so",
                                "unprobed: no probe: its section is asked"]
    full = await call(daemon, "status")
    assert "session" not in brief and "daemon" in full and "services" in full
    assert full["reasons"] == ["probed: its section says so",
                               "unprobed: no probe: its section is asked"]


async def test_brief_status_agrees_with_status_when_the_network_is_degraded(
        daemon: Daemon) -> None:
    """The network's ``degraded()`` (the probe) and its status section must say the same."""
    del daemon.extra_status["limits"]  # reads this machine's cgroups: not the point here
    nc = daemon.network

    async def agree() -> dict[str, Any]:
        brief, full = await call(daemon, "status", brief=True), await call(daemon, "status")
        assert "error" not in full["network"], full["network"]
        assert brief == {"state": full["state"], "reasons": full["reasons"]}
        assert nc.degraded() == full["network"].get("degraded")
        return brief

    assert (await agree())["reasons"] == [], "an inactive network is not degraded"
    nc.net = types.SimpleNamespace(  # type: ignore[assignment]
        opts=types.SimpleNamespace(engine=types.SimpleNamespace(value="dnsmasq"),
                                   listen="127.0.0.1", ipv6=False, ipv6_why="off", inbound=()),
        backend=types.SimpleNamespace(name="nftables"), base=Allowlist(), github=None,
        plan=types.SimpleNamespace(names={}, allowlist=Allowlist()))
    assert (await agree())["reasons"] == []
    nc.notes["github"] = "@github ranges unavailable (timeout): denied"
    assert (await agree())["reasons"] == ["network: @github ranges unavailable (timeout): denied"]
    nc.guard = types.SimpleNamespace(  # type: ignore[assignment]
        degraded="DNS server down for 3s: exited 1", status=lambda: {"up": False})
    assert (await agree())["reasons"] == ["network: DNS server down for 3s: exited 1"]


def test_check_asks_for_the_brief_status(tmp_path: Path) -> None:
    """``codetainer status --check`` sends ``brief`` and prints its one line from it."""
    import socket
    import threading

    path = str(tmp_path / "c.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    seen: list[dict[str, Any]] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            seen.append(json.loads(f.readline()))
            reply = {"v": 1, "ok": True,
                     "result": {"state": "DEGRADED", "reasons": ["network: DNS down"]}}
            f.write(json.dumps(reply).encode() + b"\n")
            f.flush()

    t = threading.Thread(target=serve)
    t.start()
    try:
        r = subprocess.run([sys.executable, "-m", "codetainer.cli.main", "--socket", path,
                            "status", "--check"], capture_output=True, text=True, timeout=30)
    finally:
        t.join(10)
        srv.close()
    assert seen and seen[0]["op"] == "status" and seen[0]["args"] == {"brief": True}
    assert (r.returncode, r.stdout) == (0, "HEALTHY: DEGRADED (network: DNS down)\n"), r.stderr
