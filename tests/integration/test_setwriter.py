"""The DNS hook's set writers with their persistent helper, against real nftables and ipset.

Each test runs in a network namespace of its own (created and removed here) holding the
dynamic sets as the firewall declares them (``flags timeout``, ``hash:ip timeout``). The
writers run their helper (``python -m codetainer.network.sethelper``) inside it through
``ip netns exec``, as a wrapped Runner runs ``nft``. What is checked is what the hook
relies on: ``add`` returns only once the kernel holds every element, many transactions
go through one helper process, a failure is an exception (never a silent success), and
a helper that dies, hangs or cannot start costs availability, never the guarantee.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from codetainer.network import setwriter
from codetainer.network.firewall import FirewallError, Runner
from codetainer.network.setwriter import BatchedWriter, IpsetWriter, NftSetWriter

pytestmark = pytest.mark.integration

SETS = """
table inet codetainer {
    set d4_443 { type ipv4_addr; flags timeout; timeout 660s; }
    set d6_443 { type ipv6_addr; flags timeout; timeout 660s; }
}
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ct-sw-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=SETS, text=True, check=True)
        for fam, set_name in (("inet", "ct-d4_443"), ("inet6", "ct-d6_443")):
            subprocess.run(["ip", "netns", "exec", name, "ipset", "create", set_name, "hash:ip",
                            "family", fam, "timeout", "660"], check=True)
        yield name
    finally:
        # the ipsets live in the namespace and go with it
        subprocess.run(["ip", "netns", "delete", name], check=False)


def runner(ns: str, timeout: float = 5.0) -> Runner:
    return Runner(["ip", "netns", "exec", ns], timeout=timeout)


def nft_elements(ns: str, name: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "set", "inet", "codetainer", name],
                         capture_output=True, text=True, check=True).stdout
    elems = json.loads(out)["nftables"][1]["set"].get("elem", [])
    return {e["elem"]["val"] if isinstance(e, dict) else e for e in elems}


def ipset_elements(ns: str, name: str) -> dict[str, int]:
    """``{address: seconds left}``."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ipset", "list", name],
                         capture_output=True, text=True, check=True).stdout
    members = out.split("Members:\n", 1)[1].split("\n")
    return {p[0]: int(p[2]) for p in (m.split() for m in members) if len(p) == 3}


@pytest.fixture
async def nft_writer(netns: str) -> AsyncIterator[NftSetWriter]:
    writer = NftSetWriter(runner(netns))
    try:
        yield writer
    finally:
        await writer.close()


def helper_pid(writer: NftSetWriter | IpsetWriter) -> int:
    assert writer.helper is not None and writer.helper.proc is not None
    return writer.helper.proc.pid


@pytest.mark.timeout(60)
async def test_each_add_is_in_the_kernel_when_it_returns_through_one_helper(
    netns: str, nft_writer: NftSetWriter
) -> None:
    helper = nft_writer.helper
    assert helper is not None
    for i in range(1, 41):
        addr = f"203.0.113.{i}"
        assert addr not in nft_elements(netns, "d4_443")
        await nft_writer.add({"d4_443": [addr], "d6_443": [f"fd00::{i:x}"]})
        # no wait, no retry: the set holds it the moment add returned
        assert addr in nft_elements(netns, "d4_443")
        assert f"fd00::{i:x}" in nft_elements(netns, "d6_443")
    pid = helper_pid(nft_writer)
    await asyncio.gather(*(nft_writer.add({"d4_443": [f"198.51.100.{i}"]}) for i in range(1, 101)))
    assert {f"198.51.100.{i}" for i in range(1, 101)} <= nft_elements(netns, "d4_443")
    assert (helper.starts, helper.oneshots, helper.transactions) == (1, 0, 140)
    many = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(2000)]  # one long script
    await nft_writer.add({"d4_443": many})
    assert set(many) <= nft_elements(netns, "d4_443")
    assert helper_pid(nft_writer) == pid and helper.transactions == 141
    # re-adding refreshes (add, delete, add in one transaction) and removing takes it out
    await nft_writer.add({"d4_443": ["203.0.113.1"]})
    await nft_writer.remove({"d4_443": ["203.0.113.1", "203.0.113.2"], "d6_443": ["fd00::1"]})
    left = nft_elements(netns, "d4_443")
    assert "203.0.113.1" not in left and "203.0.113.2" not in left and "203.0.113.3" in left
    assert "fd00::1" not in nft_elements(netns, "d6_443")
    await nft_writer.remove({"d4_443": ["203.0.113.1"]})  # already gone: still no error


@pytest.mark.timeout(60)
async def test_a_refused_transaction_raises_names_the_line_and_applies_nothing(
    netns: str, nft_writer: NftSetWriter
) -> None:
    await nft_writer.add({"d4_443": ["203.0.113.1"]})
    pid = helper_pid(nft_writer)
    # d4_80 does not exist: the whole transaction fails, d4_443's element included
    with pytest.raises(FirewallError) as err:
        await nft_writer.add({"d4_443": ["203.0.113.50"], "d4_80": ["203.0.113.51"]})
    assert "d4_80" in str(err.value) and "No such file or directory" in str(err.value)
    assert "203.0.113.50" not in nft_elements(netns, "d4_443")
    # the helper goes on serving, and a set created after it started is found
    subprocess.run(["ip", "netns", "exec", netns, "nft", "add", "set", "inet", "codetainer", "d4_80",
                    "{ type ipv4_addr; flags timeout; timeout 60s; }"], check=True)
    await nft_writer.add({"d4_443": ["203.0.113.50"], "d4_80": ["203.0.113.51"]})
    assert "203.0.113.51" in nft_elements(netns, "d4_80")
    assert helper_pid(nft_writer) == pid
    with pytest.raises(ValueError, match="refusing set name"):
        await nft_writer.add({"d4_443; flush ruleset": ["203.0.113.1"]})


@pytest.mark.timeout(60)
async def test_a_helper_that_dies_is_replaced_and_nothing_is_lost(
    netns: str, nft_writer: NftSetWriter
) -> None:
    helper = nft_writer.helper
    assert helper is not None
    await nft_writer.add({"d4_443": ["203.0.113.1"]})
    first = helper_pid(nft_writer)
    os.kill(first, signal.SIGKILL)  # our child: the writer started it
    # dead while idle or found dead mid-transaction: either way the add goes through
    await nft_writer.add({"d4_443": ["203.0.113.2"]})
    assert "203.0.113.2" in nft_elements(netns, "d4_443")
    assert helper.starts == 2 and helper_pid(nft_writer) != first and helper.oneshots == 0
    assert helper.failures == 0  # a success clears the count


@pytest.mark.timeout(60)
async def test_a_helper_that_hangs_fails_the_transaction_then_is_replaced(netns: str) -> None:
    writer = NftSetWriter(runner(netns, timeout=0.5))
    try:
        await writer.add({"d4_443": ["203.0.113.1"]})
        stuck = helper_pid(writer)
        os.kill(stuck, signal.SIGSTOP)  # it reads nothing, answers nothing
        with pytest.raises(FirewallError, match="did not apply"):
            await writer.add({"d4_443": ["203.0.113.2"]})
        # it was killed (SIGKILL ends a stopped process too) and reaped
        assert not os.path.exists(f"/proc/{stuck}")
        await writer.add({"d4_443": ["203.0.113.3"]})
        assert "203.0.113.3" in nft_elements(netns, "d4_443") and helper_pid(writer) != stuck
    finally:
        await writer.close()


@pytest.mark.timeout(60)
async def test_a_cancelled_transaction_never_leaves_the_helper_out_of_step(netns: str) -> None:
    """Cancelled at any point (after the helper was spawned but before it said it was
    ready; while a request is written or its answer read), the next transaction still
    gets its own answer, never one left over: a transaction that must fail (no such set)
    fails, and the one after it has its element in the kernel."""
    writer = NftSetWriter(runner(netns))
    helper = writer.helper
    assert helper is not None

    async def still_in_step(k: int) -> None:
        with pytest.raises(FirewallError):  # a stale "ready" or "done" would pass here
            await writer.add({"d4_80": ["203.0.113.1"]})
        await writer.add({"d4_443": [f"203.0.113.{100 + k}"]})
        assert f"203.0.113.{100 + k}" in nft_elements(netns, "d4_443"), k

    try:
        task = asyncio.ensure_future(writer.add({"d4_443": ["198.51.100.99"]}))
        while helper.proc is None:  # spawned; its greeting takes milliseconds more
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await still_in_step(99)
        for k in range(10):
            task = asyncio.ensure_future(writer.add({"d4_443": [f"198.51.100.{100 + k}"]}))
            for _ in range(k):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await still_in_step(k)
    finally:
        await writer.close()


@pytest.mark.timeout(60)
async def test_a_helper_that_cannot_start_falls_back_to_one_nft_per_transaction(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(setwriter, "HELPER_MODULE", "codetainer.network.no_such_helper")
    writer = NftSetWriter(runner(netns))
    helper = writer.helper
    assert helper is not None
    try:
        await writer.add({"d4_443": ["203.0.113.1"]})
        assert "203.0.113.1" in nft_elements(netns, "d4_443")  # by one `nft -f -`
        assert (helper.starts, helper.oneshots, helper.failures) == (0, 1, 1)
        # a first loss is retried at once; the second starts a backoff
        await writer.add({"d4_443": ["203.0.113.2"]})
        assert (helper.starts, helper.oneshots, helper.failures) == (0, 2, 2)
        assert helper.proc is None and helper.down_until > time.monotonic()
        helper.down_until = time.monotonic() + 60  # well inside it: no start is tried
        await writer.add({"d4_443": ["203.0.113.3"]})
        assert (helper.failures, helper.oneshots) == (2, 3)
        assert {"203.0.113.2", "203.0.113.3"} <= nft_elements(netns, "d4_443")
        with pytest.raises(FirewallError):  # the one-shot tool's failure is still a failure
            await writer.add({"d4_80": ["203.0.113.5"]})
        # the helper comes back once it can start and the backoff has passed
        monkeypatch.setattr(setwriter, "HELPER_MODULE", "codetainer.network.sethelper")
        helper.down_until = 0.0
        await writer.add({"d4_443": ["203.0.113.4"]})
        assert helper.starts == 1 and helper.failures == 0
    finally:
        await writer.close()


@pytest.mark.timeout(60)
async def test_ipset_writer_through_its_helper(netns: str) -> None:
    writer = IpsetWriter(runner(netns), timeout=300)
    helper = writer.helper
    assert helper is not None
    try:
        await writer.add({"d4_443": ["203.0.113.1"], "d6_443": ["fd00::1"]})
        assert ipset_elements(netns, "ct-d4_443")["203.0.113.1"] > 290
        assert "fd00::1" in ipset_elements(netns, "ct-d6_443")
        # -exist refreshes the timeout: set it low by hand, re-add, it is back near 300
        subprocess.run(["ip", "netns", "exec", netns, "ipset", "add", "ct-d4_443", "203.0.113.1",
                        "timeout", "5", "-exist"], check=True)
        assert ipset_elements(netns, "ct-d4_443")["203.0.113.1"] <= 5
        await writer.add({"d4_443": ["203.0.113.1"]})
        assert ipset_elements(netns, "ct-d4_443")["203.0.113.1"] > 290
        with pytest.raises(FirewallError, match="ct-d4_80"):
            await writer.add({"d4_80": ["203.0.113.2"]})
        await writer.remove({"d4_443": ["203.0.113.1", "203.0.113.9"]})
        assert "203.0.113.1" not in ipset_elements(netns, "ct-d4_443")
        # one transaction larger than the requests the helper sends at once
        many = [f"198.51.100.{i}" for i in range(1, 255)] + [f"192.0.2.{i}" for i in range(1, 255)]
        await writer.add({"d4_443": many})
        assert set(many) <= set(ipset_elements(netns, "ct-d4_443"))
        assert (helper.starts, helper.oneshots) == (1, 0)
    finally:
        await writer.close()


@pytest.mark.timeout(60)
async def test_batched_callers_return_only_after_their_transaction(netns: str) -> None:
    """The hook's path: BatchedWriter over the helper. Every caller, checked the moment
    it returns, finds its own address in the kernel set."""
    writer = BatchedWriter(NftSetWriter(runner(netns)))
    missing: list[str] = []

    async def one(i: int) -> None:
        addr = f"198.51.100.{i}"
        await writer.add({"d4_443": [addr]})
        # check with the kernel right away, before any other task runs
        if addr not in nft_elements(netns, "d4_443"):
            missing.append(addr)

    try:
        await asyncio.gather(*(one(i) for i in range(1, 61)))
        assert missing == []
        assert 1 <= writer.transactions < 60  # shared transactions
    finally:
        await writer.close()
