"""The one backoff (``codetainer.backoff``) and the callers moved onto the one runner:
their messages kept, their whole process group killed at the deadline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from codetainer import backoff
from codetainer.network.firewall import FirewallError, Runner
from codetainer.proxy import setup as proxy_setup
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt

from tests.unit.test_runner import file_text, gone


def test_delay_doubles_from_first_up_to_the_cap() -> None:
    assert [backoff.delay(n, 1.0, 60.0) for n in range(9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(10**6, 0.5, 30.0) == 30.0  # no overflow


async def test_until_returns_when_the_check_holds_or_at_the_deadline() -> None:
    calls = 0

    async def third() -> bool:
        nonlocal calls
        calls += 1
        return calls == 3

    assert await backoff.until(third, timeout=5) and calls == 3

    async def never() -> bool:
        return False

    t0 = time.monotonic()
    assert not await backoff.until(never, timeout=0.3, cap=0.05)
    assert 0.3 <= time.monotonic() - t0 < 1.0


async def test_last_result_is_the_last_attempts() -> None:
    results = iter([1, 2, 3, 4])

    async def attempt() -> int:
        return next(results)

    retrying = AsyncRetrying(stop=stop_after_attempt(3), wait=backoff.exponential(0.01, 0.01),
                             retry=retry_if_result(lambda r: r < 10),
                             retry_error_callback=backoff.last_result)
    assert await retrying(attempt) == 3


async def test_firewall_runner_timeout_kills_the_group_and_says_so(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    run = Runner(timeout=0.3)
    with pytest.raises(FirewallError, match=r"sh did not finish within 0s \(probe\): the kernel"):
        await run.run(["sh", "-c", f"sleep 1000 & echo $! > {pids}; wait"], what="probe")
    assert await gone(int(await file_text(pids)))
    assert await run.run(["sh", "-c", "cat; echo e >&2; exit 3"], "in", check=False) == (3, "in", "e\n")
    with pytest.raises(FirewallError, match="/nonexistent/nft is not installed"):
        await run.run(["/nonexistent/nft"])


async def test_proxy_tool_reports_what_failed() -> None:
    assert await proxy_setup._tool(["sh", "-c", "echo out; echo err >&2; exit 2"]) == (2, "out\nerr")
    assert await proxy_setup._tool(["sleep", "100"], timeout=0.2) == (
        -1, "sleep did not finish within 0s")
    rc, why = await proxy_setup._tool(["/nonexistent/openssl"])
    assert rc == -1 and "cannot run /nonexistent/openssl" in why


async def test_repository_git_has_a_deadline(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    from codetainer.boot import repository
    from codetainer.boot.repository import CloneError

    monkeypatch.setattr(repository, "GIT_TIMEOUT", 0.2)
    fake = tmp_path / "git"
    fake.write_text("#!/bin/sh\nsleep 1000\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    t0 = time.monotonic()
    with pytest.raises(CloneError, match=r"git config: timed out after 0.2s"):
        await asyncio.wait_for(repository.git("config", "-l"), 5)
    assert time.monotonic() - t0 < 3
