"""The refresh task with a fake resolver, a fake firewall and a fake clock."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence

import pytest
from codetainer.network.dnscheck import Resolution
from codetainer.network.refresh import Contents, Refresher

P = (80, 443)
Q = (443,)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall_t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.wall_t + self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


class FakeDns:
    """name -> (addresses, ttl) or an error string; ``cost`` seconds of fake time per call."""

    def __init__(self, clock: Clock, answers: dict[str, tuple[list[str], int] | str]) -> None:
        self.clock = clock
        self.answers = answers
        self.calls: list[tuple[float, list[str]]] = []
        self.cost = 0.0

    async def __call__(self, names: Sequence[str]) -> Mapping[str, Resolution]:
        self.calls.append((self.clock.t, list(names)))
        self.clock.t += self.cost
        out = {}
        for n in names:
            a = self.answers.get(n, "NXDOMAIN")
            if isinstance(a, str):
                out[n] = Resolution(n, (), None, a)
            else:
                out[n] = Resolution(n, tuple(a[0]), a[1], None)
        return out


class FakeFirewall:
    def __init__(self) -> None:
        self.applied: list[Contents] = []
        self.fail = False

    async def __call__(self, contents: Contents) -> None:
        if self.fail:
            raise RuntimeError("nft: kernel says no")
        self.applied.append(contents)

    @property
    def last(self) -> Contents:
        return self.applied[-1]


def make(answers: dict[str, tuple[list[str], int] | str], names: dict[str, tuple[int, ...]] | None = None,
         **kw: float) -> tuple[Refresher, FakeDns, FakeFirewall, Clock]:
    clock = Clock()
    dns = FakeDns(clock, answers)
    fw = FakeFirewall()
    opts: dict[str, float] = {"min_ttl": 30, "max_ttl": 300, "grace": 600, **kw}
    r = Refresher(names if names is not None else {n: P for n in answers}, dns, fw,
                  fixed={Q: ["198.51.100.0/24"]}, clock=clock, wall=clock.wall, sleep=clock.sleep,
                  **opts)
    return r, dns, fw, clock


async def test_first_tick_resolves_everything_in_one_call_and_applies_groups() -> None:
    r, dns, fw, _ = make({"a.test": (["203.0.113.1"], 60), "b.test": (["203.0.113.2", "203.0.113.3"], 60)},
                         names={"a.test": P, "b.test": Q})
    report = await r.tick()
    assert len(dns.calls) == 1 and sorted(dns.calls[0][1]) == ["a.test", "b.test"]
    assert fw.last == {P: ("203.0.113.1",), Q: ("198.51.100.0/24", "203.0.113.2", "203.0.113.3")}
    assert (report.names, report.ok, report.failed, report.addresses) == (2, 2, 0, 3)
    assert report.applied and report.changed and r.degraded is None


@pytest.mark.parametrize(("ttl", "interval"), [(5, 30), (100, 100), (3600, 300), (None, 30)])
async def test_each_name_is_scheduled_by_its_clamped_ttl(ttl: int | None, interval: float) -> None:
    r, dns, _, clock = make({"a.test": (["203.0.113.1"], ttl or 0)})
    if ttl is None:
        dns.answers["a.test"] = "SERVFAIL"
        dns.answers["b.test"] = (["203.0.113.9"], 300)
        r.update({"a.test": P, "b.test": P}, r.fixed)
    await r.tick()
    assert r.names["a.test"].due == pytest.approx(clock.t + interval)


async def test_removed_address_stays_for_the_grace_period() -> None:
    r, dns, fw, clock = make({"a.test": (["203.0.113.1", "203.0.113.2"], 60)}, grace=100)
    await r.tick()
    dns.answers["a.test"] = (["203.0.113.2"], 60)
    clock.t += 60
    await r.tick()
    assert fw.last[P] == ("203.0.113.1", "203.0.113.2")  # still in grace
    clock.t += 60  # 120 s since .1 was last seen
    await r.tick()
    assert fw.last[P] == ("203.0.113.2",)
    assert len(fw.applied) == 2  # the middle tick changed nothing: no transaction


async def test_a_failing_name_keeps_its_last_good_addresses_past_the_grace() -> None:
    r, dns, fw, clock = make({"a.test": (["203.0.113.1"], 60), "b.test": (["203.0.113.5"], 60)}, grace=50)
    await r.tick()
    dns.answers["a.test"] = "SERVFAIL"
    for _ in range(5):
        clock.t += 30
        await r.tick()
    assert fw.last[P] == ("203.0.113.1", "203.0.113.5")
    st = r.figures()
    assert st["failing"][0]["name"] == "a.test" and st["failing"][0]["failures"] >= 2
    assert st["failing"][0]["kept"] == ["203.0.113.1"]
    assert r.degraded is None  # b.test still resolves: not a total failure
    # a failing name is retried at the floor, not at its old TTL
    assert r.names["a.test"].due == pytest.approx(clock.t + 30)


async def test_total_failure_changes_nothing_and_marks_degraded() -> None:
    r, dns, fw, clock = make({"a.test": (["203.0.113.1"], 60), "b.test": (["203.0.113.5"], 60)}, grace=10)
    await r.tick()
    applied = len(fw.applied)
    before = r.contents()
    dns.answers = {"a.test": "TIMEOUT", "b.test": "TIMEOUT"}
    for _ in range(4):
        clock.t += 300  # far beyond the grace period
        report = await r.tick()
        assert report.all_failed and not report.applied
    assert len(fw.applied) == applied and r.contents() == before
    assert r.degraded is not None and "all 2 lookups failed" in r.degraded
    assert r.figures()["last_refresh"]["all_failed"] is True
    dns.answers = {"a.test": (["203.0.113.1"], 60), "b.test": (["203.0.113.6"], 60)}
    clock.t += 30
    await r.tick()
    assert r.degraded is None
    assert fw.last[P] == ("203.0.113.1", "203.0.113.6")  # .5 went: not seen for > grace


async def test_failed_apply_is_degraded_and_retried() -> None:
    r, _dns, fw, clock = make({"a.test": (["203.0.113.1"], 30)})
    fw.fail = True
    report = await r.tick()
    assert report.error and "kernel says no" in report.error and r.degraded
    fw.fail = False
    clock.t += 30
    report = await r.tick()  # same contents, but the last apply failed: applied now
    assert report.applied and fw.last[P] == ("203.0.113.1",) and r.degraded is None


async def test_ticks_do_not_drift_and_overruns_are_counted() -> None:
    r, dns, _, _clock = make({"a.test": (["203.0.113.1"], 30)})
    dns.cost = 2.0  # every refresh takes 2 s
    task = asyncio.create_task(r.run())
    while len(dns.calls) < 6:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    starts = [t for t, _ in dns.calls]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[1:] == [pytest.approx(30.0)] * len(gaps[1:])  # deadline to deadline, not 32 s
    assert r.overruns == 0
    # a refresh slower than the interval is an overrun, rescheduled from now
    r2, dns2, _, _ = make({"a.test": (["203.0.113.1"], 30)})
    await r2.tick()
    dns2.cost = 45.0
    await r2.tick(["a.test"])
    assert r2.overruns == 0  # an explicit early refresh starts a new cycle
    dns2.cost = 45.0
    r2.names["a.test"].due = r2.clock()  # due now, takes 45 s > 30 s interval
    await r2.tick()
    assert r2.overruns == 1


async def test_names_due_close_together_share_one_tick() -> None:
    r, dns, _fw, clock = make({"a.test": (["203.0.113.1"], 60), "b.test": (["203.0.113.2"], 60)})
    await r.tick()
    r.names["b.test"].due += 0.4  # within the batching window
    clock.t = r.names["a.test"].due
    await r.tick()
    assert sorted(dns.calls[-1][1]) == ["a.test", "b.test"]


async def test_update_adds_names_due_now_and_drops_removed_ones() -> None:
    r, _dns, fw, _ = make({"a.test": (["203.0.113.1"], 60), "b.test": (["203.0.113.2"], 60)},
                         names={"a.test": P})
    await r.tick()
    added = r.update({"b.test": P}, {})
    assert added == ["b.test"]
    assert r.names["b.test"].due == 0
    await r.tick(added, force=True)
    assert fw.last == {P: ("203.0.113.2",)}  # a.test and the fixed range are gone at once
    assert r.names_for("203.0.113.2") == ["b.test"] and r.names_for("203.0.113.1") == []


def test_bad_bounds_are_rejected() -> None:
    async def nop(*_: object) -> dict[str, Resolution]:
        return {}

    with pytest.raises(ValueError, match="floor"):
        Refresher({}, nop, nop, min_ttl=60, max_ttl=30)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grace"):
        Refresher({}, nop, nop, grace=-1)  # type: ignore[arg-type]
