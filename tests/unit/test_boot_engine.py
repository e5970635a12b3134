"""Boot engine: the state table, and a step that outlives its timeout fails, with its
policy's consequences."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from codetainer.boot.engine import (
    BOOT_TRANSITIONS,
    BootContext,
    BootEngine,
    BootState,
    InvalidTransition,
    Policy,
    Step,
    StepFn,
    StepState,
)
from codetainer.events import EventBus
from codetainer.settings import Settings

TIMEOUT = 0.2

ALLOWED = {
    ("BOOTING", "READY"), ("BOOTING", "DEGRADED"), ("BOOTING", "FAILED"), ("BOOTING", "STOPPING"),
    ("READY", "STOPPING"), ("DEGRADED", "STOPPING"), ("FAILED", "STOPPING"), ("STOPPING", "STOPPED"),
}


@pytest.mark.parametrize("old", list(BootState))
@pytest.mark.parametrize("new", list(BootState))
def test_every_transition_is_allowed_or_raises(old: BootState, new: BootState) -> None:
    engine = BootEngine([], BootContext(Settings(), EventBus()))
    engine.state = old  # set up the starting point directly; the move under test goes through
    if (old.value, new.value) in ALLOWED:
        engine.change_state(new)
        assert engine.state is new
    else:
        with pytest.raises(InvalidTransition, match=f"{old.value} -> {new.value} is not allowed"):
            engine.change_state(new)
        assert engine.state is old


def test_the_table_in_code_and_readme_agree() -> None:
    assert {(a.value, b.value) for a, bs in BOOT_TRANSITIONS.items() for b in bs} == ALLOWED
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for old in BootState:
        targets = sorted(b for a, b in ALLOWED if a == old.value)
        if targets:
            order = [s.value for s in BootState]
            row = f"| {old.value} | {', '.join(sorted(targets, key=order.index))} |"
            assert row in readme, row


class Probe:
    """Step bodies that record whether they ran and whether they were cut off."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.cancelled: list[str] = []

    def sleeps_past_timeout(self, name: str) -> StepFn:
        async def run(ctx: BootContext) -> str:
            self.ran.append(name)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.append(name)
                raise
            return "slept"

        return run

    def quick(self, name: str) -> StepFn:
        async def run(ctx: BootContext) -> str:
            self.ran.append(name)
            return f"{name} done"

        return run


def engine(steps: list[Step]) -> BootEngine:
    return BootEngine(steps, BootContext(settings=Settings(), events=EventBus()))


async def run_timed(eng: BootEngine) -> tuple[BootState, float]:
    t0 = time.monotonic()
    state = await asyncio.wait_for(eng.run(), 10)
    return state, time.monotonic() - t0


async def test_fatal_step_past_its_timeout_fails_boot_and_skips_the_rest() -> None:
    p = Probe()
    eng = engine([
        Step("first", p.quick("first"), timeout=5),
        Step("slow", p.sleeps_past_timeout("slow"), timeout=TIMEOUT, policy=Policy.FATAL),
        Step("later", p.quick("later"), timeout=5, policy=Policy.DEGRADED),
        Step("last", p.quick("last"), timeout=5),
    ])
    state, took = await run_timed(eng)
    assert state is BootState.FAILED and eng.state is BootState.FAILED
    assert eng.done.is_set()
    slow = eng.records["slow"]
    assert slow.state is StepState.FAILED
    assert slow.reason == f"timed out after {TIMEOUT:g}s"
    assert slow.duration_s is not None and TIMEOUT <= slow.duration_s < 5  # cut off, not slept
    assert took < 5
    assert p.cancelled == ["slow"]  # the step's coroutine was cancelled, not left running
    assert p.ran == ["first", "slow"]
    for name in ("later", "last"):
        assert eng.records[name].state is StepState.SKIPPED
        assert eng.records[name].reason == "skipped: an earlier fatal step failed"
    assert eng.records["first"].state is StepState.OK
    assert eng.reasons() == [f"slow: timed out after {TIMEOUT:g}s"]
    published = [e for e in eng.ctx.events.history if e["event"] == "boot.step"
                 and e["name"] == "slow" and e["state"] == "FAILED"]
    assert len(published) == 1 and published[0]["reason"] == f"timed out after {TIMEOUT:g}s"
    assert [e["state"] for e in eng.ctx.events.history if e["event"] == "boot.state"] == ["FAILED"]


async def test_degraded_step_past_its_timeout_degrades_boot_and_the_rest_run() -> None:
    p = Probe()
    eng = engine([
        Step("slow", p.sleeps_past_timeout("slow"), timeout=TIMEOUT, policy=Policy.DEGRADED),
        Step("later", p.quick("later"), timeout=5),
        Step("needs-slow", p.quick("needs-slow"), timeout=5, requires=("slow",)),
        Step("last", p.quick("last"), timeout=5, policy=Policy.DEGRADED),
    ])
    state, took = await run_timed(eng)
    assert state is BootState.DEGRADED and eng.state is BootState.DEGRADED
    slow = eng.records["slow"]
    assert slow.state is StepState.DEGRADED
    assert slow.reason == f"timed out after {TIMEOUT:g}s"
    assert slow.duration_s is not None and TIMEOUT <= slow.duration_s < 5
    assert took < 5
    assert p.cancelled == ["slow"]
    assert p.ran == ["slow", "later", "last"]
    assert (eng.records["later"].state, eng.records["later"].reason) == (StepState.OK, "later done")
    assert eng.records["last"].state is StepState.OK
    # only a step that requires the timed-out one is skipped
    assert eng.records["needs-slow"].state is StepState.SKIPPED
    assert eng.records["needs-slow"].reason == "skipped: needs slow"
    assert eng.reasons() == [f"slow: timed out after {TIMEOUT:g}s"]


async def test_step_within_its_timeout_is_not_cut_off() -> None:
    async def takes_a_while(ctx: BootContext) -> str:
        await asyncio.sleep(TIMEOUT / 2)
        return "made it"

    eng = engine([Step("ok", takes_a_while, timeout=TIMEOUT * 10)])
    state, _ = await run_timed(eng)
    assert state is BootState.READY
    assert (eng.records["ok"].state, eng.records["ok"].reason) == (StepState.OK, "made it")


async def test_what_steps_hand_over_reaches_later_steps_and_the_daemons_shutdown(
        tmp_path: Path) -> None:
    """Typed hand-over: a step's teardowns are awaited at shutdown, last registered first,
    one that fails does not keep the others from running; what a step leaves in the
    context (the agent's account, services it started) is what a later step reads."""
    from codetainer.boot.privileges import AgentUser
    from codetainer.daemon import Daemon

    order: list[str] = []
    seen: list[object] = []

    def stop(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            order.append(name)
            if name == "broken":
                raise RuntimeError("cannot close")
        return run

    async def first(ctx: BootContext) -> str:
        ctx.agent_user = AgentUser("me", 4242, 4242, str(tmp_path))
        ctx.started_by_steps.append("dns")
        for name in ("limits", "broken", "proxy"):
            ctx.teardowns[name] = stop(name)
        return "handed over"

    async def second(ctx: BootContext) -> str:
        seen.extend([ctx.agent().uid, list(ctx.started_by_steps)])
        return "read"

    settings = Settings(run_dir=str(tmp_path), socket=str(tmp_path / "control.sock"),
                        services=str(tmp_path / "none.conf"))
    daemon = Daemon(settings, steps=[Step("first", first, timeout=5),
                                     Step("second", second, timeout=5)])
    assert daemon.ctx.services is daemon.services and daemon.ctx.daemon is daemon
    assert await daemon.engine.run() is BootState.READY
    assert seen == [4242, ["dns"]]
    await daemon._orderly()
    assert order == ["proxy", "broken", "limits"]
