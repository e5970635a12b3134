"""The DNS server never stays down: the real daemon, a real server that crash-loops to FATAL.

The server is made unable to start by something it cannot fix (another socket holds its
address, 127.0.0.53:53, UDP and TCP): every start exits at once, the supervisor's
retries run out (FATAL), and from there the daemon's guard starts it again and again,
with a growing wait. Meanwhile the network, and the overall status, are DEGRADED with a
reason that says what to do; once the address is free the server comes back by itself
and everything is healthy again. Each test runs with both engines.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from codetainer.sandbox.daemonproc import DaemonProc
from codetainer.sandbox.world import PYTHON, World

from tests.integration.test_network_daemon import (
    ALLOWED,
    ENGINES,
    RECORDS,
    SERVICES,
    dig,
    start_daemon,
    wait_boot,
)

pytestmark = pytest.mark.integration

#: the supervisor gives up after one retry, so FATAL comes within seconds
ONE_RETRY = SERVICES.replace("startretries=5", "startretries=1")
_HOLD_PORT = r"""
import socket, sys
held = []
for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind((sys.argv[1], 53))
    if kind == socket.SOCK_STREAM:
        s.listen(1)
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def hold_port(world: World, addr: str = "127.0.0.53") -> subprocess.Popen[str]:
    """Bind ``addr``:53 (no SO_REUSEADDR) in the container's netns until stdin closes."""
    proc = world.spawn_in(world.inner, [PYTHON, "-I", "-c", _HOLD_PORT, addr])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def guard(d: DaemonProc) -> dict[str, Any]:
    st = d.status()
    return {"state": st["state"], "reasons": st["reasons"], **st["network"]["dns_guard"],
            "degraded": st["network"]["degraded"], "service": d.service("dns")}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_server_that_crash_loops_to_fatal_comes_back_once_it_can(open_tmp: Path, engine: str) -> None:
    with World() as world:
        for name, addrs in RECORDS.items():
            world.set_records(name, addrs)
        d = start_daemon(world, open_tmp, services=ONE_RETRY, engine=engine,
                         env={"CODETAINER_DNS_HEALTH_INTERVAL": "1"})
        try:
            st = wait_boot(d)
            assert st["state"] == "READY"
            # (off Fly, IPv6 is denied, and status says why)
            assert st["network"]["ipv6_reason"] == "auto: not a Fly Machine, FLY_MACHINE_ID is not set"
            d.wait_until(lambda: d.service("dns")["state"] == "RUNNING", 10, "dns RUNNING")
            # An operator's stop is respected, and said.
            d.call("stop", name="dns")
            st = d.wait_until(lambda: (g := guard(d))["degraded"] and g, 10, "DEGRADED after a stop")
            assert "stopped on request: `codetainer start dns`" in st["degraded"]
            assert st["state"] == "DEGRADED" and st["revivals"] == 0
            # Its address taken: every start exits at once, until the supervisor gives up.
            holder = hold_port(world)
            d.call("start", name="dns")
            st = d.wait_until(lambda: (g := guard(d))["revivals"] >= 2 and g, 40,
                              "the guard starting it again after FATAL, twice")
            assert st["up"] is False and st["state"] == "DEGRADED", st
            assert any(r.startswith("network: DNS server down for ") for r in st["reasons"]), st
            assert "the supervisor gave up" in st["degraded"], st["degraded"]
            assert "`codetainer restart dns`" in st["degraded"], st["degraded"]
            assert st["service"]["restarts"] >= 3 and st["service"]["last_exit"], st["service"]
            assert dig(world, "allowed.test")[0] != "NOERROR"
            # Free again: it comes back by itself, and the status is healthy again.
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
            d.wait_until(lambda: dig(world, "allowed.test") == ("NOERROR", [ALLOWED]), 45,
                         "the server answering again")
            st = d.wait_until(lambda: (g := guard(d))["state"] == "READY" and g, 10, "READY again")
            assert st["up"] is True and st["degraded"] is None and st["recoveries"] >= 1, st
            assert not any(r.startswith("network:") for r in st["reasons"])
            assert dig(world, "denied.test") == ("NXDOMAIN", [])  # still filtering
            events = [e["event"] for e in d.events()]
            assert "service_gave_up" in events and "dns_revive" in events
            assert "dns_down" in events and "dns_recovered" in events
        finally:
            d.close()
