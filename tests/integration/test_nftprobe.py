"""The nftables probe codetainerd starts before its imports (``network/nftprobe.py``),
against real nftables in a network namespace of its own (created and removed here).

What the ``network-config`` step relies on: the early probe's answer is the probe's
(nftables chosen, nothing left behind), it is taken once and only for the ``nat`` it was
started for, and a probe never asked for is killed and reaped, not left a zombie.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.integration

CHILD = r"""
import asyncio, json, os
from codetainer.network import nftprobe
from codetainer.network.firewall import probe_backend

def children():
    me = str(os.getpid())
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            out.append(pid)
    return out

async def main():
    out = {}
    nftprobe.start_early("auto", False)
    out["started"] = nftprobe._early is not None
    out["backend"] = await probe_backend("auto", nat=False)
    out["taken"] = nftprobe._early is None
    nftprobe.start_early("auto", True)
    out["other_nat"] = await nftprobe.collect(False, 5.0)
    nftprobe.start_early("auto", False)
    nftprobe.discard()
    nftprobe.start_early("nftables", False)
    out["forced_started"] = nftprobe._early is not None
    out["children"] = children()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ct-np-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.timeout(60)
def test_early_probe_is_the_probe_taken_once_and_never_left_behind(netns: str) -> None:
    run = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CHILD],
                         capture_output=True, text=True, timeout=50, check=False)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["started"] and out["backend"] == "nftables" and out["taken"]
    assert out["other_nat"] is None  # started with the proxy's redirect: not this answer
    assert not out["forced_started"]  # CODETAINER_FIREWALL=nftables: nothing to probe
    assert out["children"] == []  # every early probe reaped (taken, mismatched, discarded)
    tables = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables"],
                            capture_output=True, text=True, check=True).stdout
    assert "codetainer_probe" not in tables
