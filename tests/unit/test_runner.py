"""The one subprocess runner (``codetainer.runner``) with real processes: decoding, the
deadline, the whole process group killed at it, cancellation, no fd or zombie left."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from codetainer import runner
from codetainer.session import tmuxctl
from codetainer.session.tmuxctl import SessionError


async def gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` has exited (a zombie nobody reaps counts as gone); one that
    did not is killed here (the test started it) and False returned."""
    try:
        watch = runner.ExitWatch(pid)
    except ProcessLookupError:
        return True
    try:
        await asyncio.wait([watch.exited], timeout=timeout)
        if not watch.exited.done():
            os.kill(pid, signal.SIGKILL)
        return watch.exited.done()
    finally:
        watch.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reaped(child: int) -> bool:
    try:
        return psutil.Process(child).ppid() != os.getpid()  # a reused pid is not ours
    except psutil.NoSuchProcess:
        return True


async def file_text(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} was not written"
        await asyncio.sleep(0.01)
    return path.read_text()


async def test_exit_status_and_output_are_decoded() -> None:
    done = await runner.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=5)
    assert (done.code, done.exit, done.stdout, done.stderr) == (7, "exited 7", "out\n", "err\n")
    assert not done.ok and not done.timed_out and done.outcome == "exited 7"
    merged = await runner.run(["sh", "-c", "echo out; echo err >&2"], timeout=5,
                              merge_stderr=True)
    assert merged.ok and merged.stdout == "out\nerr\n" and merged.stderr == ""
    killed = await runner.run(["sh", "-c", "kill -TERM $$"], timeout=5)
    assert (killed.code, killed.exit) == (-signal.SIGTERM, "killed by SIGTERM")
    bad = await runner.run(["printf", "\\377ok"], timeout=5)
    assert bad.stdout == "\ufffdok"


async def test_input_larger_than_a_pipe_reaches_stdin() -> None:
    data = os.urandom(300_000).hex().encode()
    done = await runner.run(["sha256sum"], timeout=10, input=data)
    assert done.ok and done.stdout.split()[0] == hashlib.sha256(data).hexdigest()


async def test_a_command_that_cannot_start_is_a_spawn_error() -> None:
    with pytest.raises(runner.SpawnError, match="cannot run /nonexistent/tool: No such file") as exc:
        await runner.run(["/nonexistent/tool"], timeout=5)
    assert exc.value.errno == errno.ENOENT


async def test_timeout_kills_the_whole_group_even_what_ignores_sigterm() -> None:
    # the leader and its grandchild both ignore SIGTERM: SIGKILL after the grace
    script = "trap '' TERM; sleep 1000 & echo $!; wait; echo never"
    t0 = time.monotonic()
    done = await runner.run(["sh", "-c", script], timeout=0.5, grace=0.3)
    elapsed = time.monotonic() - t0
    assert done.timed_out and not done.ok and done.outcome == "timed out after 0.5s"
    assert (done.code, done.exit) == (-signal.SIGKILL, "killed by SIGKILL")
    assert 0.8 <= elapsed < 3.0, elapsed  # deadline + grace, then the kill
    grandchild = int(done.stdout.split()[0])  # what it said before the deadline is kept
    assert await gone(grandchild), "a grandchild survived the timeout"
    assert "never" not in done.stdout


async def test_timeout_sigterm_is_enough_for_a_polite_group() -> None:
    done = await runner.run(["sh", "-c", "sleep 1000 & echo $!; wait"], timeout=0.3, grace=5)
    assert done.timed_out and done.exit == "killed by SIGTERM"
    assert await gone(int(done.stdout.split()[0]))


async def test_a_command_done_in_time_leaves_its_group_alone() -> None:
    done = await runner.run(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"], timeout=5)
    background = int(done.stdout.split()[0])
    try:
        assert done.ok and alive(background), "nothing is killed when the command ends in time"
    finally:
        os.kill(background, signal.SIGKILL)
    assert await gone(background)


async def test_output_held_open_by_a_child_waits_for_the_deadline_then_kills() -> None:
    # the leader ends at once, its child keeps stdout open: the group dies at the deadline
    done = await runner.run(["sh", "-c", "sleep 1000 & echo $!"], timeout=0.3, grace=0.3)
    assert done.timed_out and done.exit == "exited 0"
    assert await gone(int(done.stdout.split()[0]))


async def test_cancelled_caller_kills_the_group_and_the_leader_is_reaped(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    task = asyncio.create_task(runner.run(
        ["sh", "-c", f"sleep 1000 & echo $$ $! > {pids}; wait"], timeout=60))
    leader, grandchild = map(int, (await file_text(pids)).split())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await gone(grandchild) and await gone(leader)
    deadline = time.monotonic() + 5
    while not reaped(leader):
        assert time.monotonic() < deadline, "the cancelled command was never reaped"
        await asyncio.sleep(0.01)


async def test_no_file_descriptor_or_zombie_is_left() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        await runner.run(["sh", "-c", "echo x; cat"], timeout=5, input=b"y")
    await runner.run(["sleep", "1000"], timeout=0.05, grace=0.05)
    assert len(os.listdir("/proc/self/fd")) == before
    assert not [c for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]


async def test_tmux_client_timeout_kills_its_group_and_says_so(tmp_path: Path) -> None:
    """session/tmuxctl.run (every tmux client the daemon runs) goes through the runner:
    what a hung client forked dies with it."""
    pids = tmp_path / "pids"
    with pytest.raises(SessionError, match=r"sh did not answer within 0.3s"):
        await tmuxctl.run(["/bin/sh", "-c", f"sleep 1000 & echo $! > {pids}; wait"],
                          timeout=0.3)
    assert await gone(int(await file_text(pids)))
    with pytest.raises(SessionError, match="cannot run /nonexistent/tmux"):
        await tmuxctl.run(["/nonexistent/tmux"])
    assert await tmuxctl.run(["sh", "-c", "echo o; echo e >&2; exit 3"]) == (3, "o\n", "e\n")


async def test_wait_gone_is_woken_by_the_exit(tmp_path: Path) -> None:
    done = await runner.run(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"], timeout=5)
    pid = int(done.stdout)
    t0 = time.monotonic()
    assert [p.pid for p in await tmuxctl.wait_gone([pid], 0.2)] == [pid]
    assert 0.2 <= time.monotonic() - t0 < 1.0  # its deadline kept
    waiting = asyncio.create_task(tmuxctl.wait_gone([pid, 999_999_999], 10))
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert await waiting == []
    assert time.monotonic() - t0 < 1.0
