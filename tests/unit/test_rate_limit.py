"""The output rate limit of services (README: 100 lines/s, bursts of 200), on a fake clock."""

from __future__ import annotations

from codetainer.services.process import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def allowed(limit: RateLimit, n: int) -> int:
    return sum(limit.allow() for _ in range(n))


def test_defaults_are_the_documented_figures() -> None:
    limit = RateLimit()
    assert (limit.rate, limit.burst) == (100.0, 200.0)


def test_burst_of_200_then_refused() -> None:
    clock = Clock()
    limit = RateLimit(clock=clock)
    assert allowed(limit, 200) == 200
    assert not limit.allow()
    assert allowed(limit, 4799) == 0
    assert limit.dropped == 4800


def test_refills_at_100_lines_a_second() -> None:
    clock = Clock()
    limit = RateLimit(clock=clock)
    assert allowed(limit, 1000) == 200
    clock.now += 0.5
    assert allowed(limit, 1000) == 50
    clock.now += 0.25
    assert allowed(limit, 1000) == 25
    clock.now += 0.125  # an eighth of a second: 12.5 tokens, 12 whole lines
    assert allowed(limit, 1000) == 12


def test_idle_refill_is_capped_at_the_burst() -> None:
    clock = Clock()
    limit = RateLimit(clock=clock)
    assert allowed(limit, 200) == 200
    clock.now += 3600
    assert allowed(limit, 1000) == 200


def test_sustained_flood_passes_the_rate_plus_one_burst() -> None:
    clock = Clock()
    limit = RateLimit(clock=clock)
    passed = 0
    for _ in range(10_000):  # 1000 lines/s for 10 s
        passed += limit.allow()
        clock.now += 0.001
    assert 200 + 1000 - 1 <= passed <= 200 + 1000 + 1
    assert limit.dropped == 10_000 - passed


def test_unreported_count_is_taken_once_and_total_kept() -> None:
    clock = Clock()
    limit = RateLimit(rate=10, burst=5, clock=clock)
    assert allowed(limit, 8) == 5
    assert limit.take_unreported() == 3
    assert limit.take_unreported() == 0
    clock.now += 0.1
    assert allowed(limit, 4) == 1
    assert limit.take_unreported() == 3
    assert limit.dropped == 6
