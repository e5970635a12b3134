"""The refresh task: keep the firewall's *static* sets in step with DNS.

Every exact allowlisted name is resolved through the local DNS server (concurrently,
:func:`codetainer.network.dnscheck.resolve_all`), and each name is scheduled again by
its TTL clamped to ``[min_ttl, max_ttl]``. The static sets hold, per port group, every
address seen for its names within the last ``grace`` seconds:

* an address that stops appearing stays allowed for ``grace`` seconds (connections
  opened just before a rotation keep working);
* a name whose lookup fails keeps its last good addresses (they are "seen" again on
  every failed attempt, so they do not age out while the name is failing);
* when *every* lookup of a tick fails (upstream down, DNS server down) nothing changes
  at all: no address ages out, the sets are not touched, and the network is marked
  DEGRADED with the reason until a tick succeeds again;
* the sets are replaced in one transaction (``apply`` is the firewall backend's
  ``update_sets``), and only when their contents changed.

Zero race and the static sets. dnsmasq fills the *dynamic* sets before it answers, but
it adds an element only on a cache miss, and nft 1.0.6 does not refresh an element's
timeout when it is added again. We do not rely on either: the static sets are the
backstop. An address a client got at ``t0`` sits in the dynamic set until at least
``t0 + 2*max_ttl + 60`` (``dnsconfig.set_timeout_for``); the name is refreshed at least
every ``max_ttl``, so if the address is still current it is in the static set long
before the dynamic element expires, and if it is not, ``grace`` covers the clients that
still hold it. (The CoreDNS-side hook, :mod:`.dnshook`, does refresh the timeout: it
re-adds elements as delete+add inside one transaction.)

Ticks do not drift: each name carries a deadline on the monotonic clock and its next
deadline is computed from the previous one, not from when the work finished. A tick
that finishes after a name's next deadline is an overrun; it is counted and logged
(``refresh_overrun``) and that name is rescheduled from now. Names whose deadlines fall
within a short window are refreshed together, so a thousand names with similar TTLs
cost one transaction, not a thousand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from codetainer.network.dnscheck import Resolution
from codetainer.network.model import Ports, is_internal

if TYPE_CHECKING:
    from codetainer.status import LastRefresh, RefreshFigures

log = structlog.get_logger("codetainer.network")

Contents = dict[Ports, tuple[str, ...]]
ResolveFn = Callable[[Sequence[str]], Awaitable[Mapping[str, Resolution]]]
ApplyFn = Callable[[Contents], Awaitable[None]]


@dataclass
class NameState:
    name: str
    ports: Ports
    #: address -> monotonic time it was last seen in an answer (or kept as last good)
    seen: dict[str, float] = field(default_factory=dict)
    last_good: tuple[str, ...] = ()
    #: monotonic deadline of the next lookup (0: as soon as possible)
    due: float = 0.0
    ttl: int | None = None
    error: str | None = None
    failures: int = 0
    #: wall time of the first failure in the current run of failures
    failing_since: float | None = None
    last_ok: float | None = None


@dataclass
class TickReport:
    at: float  # wall clock
    duration_s: float
    names: int
    ok: int
    failed: int
    addresses: int
    changed: bool
    applied: bool
    #: the tick changed nothing because every lookup failed
    all_failed: bool = False
    error: str | None = None

    def as_dict(self) -> LastRefresh:
        return {
            "at": self.at,
            "duration_s": round(self.duration_s, 4),
            "names": self.names,
            "ok": self.ok,
            "failed": self.failed,
            "addresses": self.addresses,
            "changed": self.changed,
            "all_failed": self.all_failed,
            "error": self.error,
        }


class Refresher:
    def __init__(
        self,
        names: Mapping[str, Ports],
        resolve: ResolveFn,
        apply: ApplyFn,
        *,
        fixed: Mapping[Ports, Iterable[str]] | None = None,
        min_ttl: float = 30.0,
        max_ttl: float = 300.0,
        grace: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 0 < min_ttl <= max_ttl:
            raise ValueError(
                f"refresh TTL floor {min_ttl:g}s and ceiling {max_ttl:g}s: need 0 < floor <= ceiling"
            )
        if grace < 0:
            raise ValueError(f"refresh grace {grace:g}s must not be negative")
        self.resolve = resolve
        self.apply_fn = apply
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.grace = float(grace)
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        #: names due within this many seconds of the earliest deadline join its tick
        self.window = min(1.0, self.min_ttl / 2)
        self.lock = asyncio.Lock()
        self.names: dict[str, NameState] = {}
        self.fixed: Contents = {}
        self.applied: Contents | None = None
        self._retry_apply = False
        self.degraded: str | None = None
        self.last: TickReport | None = None
        self.ticks = 0
        #: transactions that replaced the static sets
        self.applies = 0
        self.overruns = 0
        self.update(names, fixed or {})

    # -- configuration ---------------------------------------------------------------

    def update(self, names: Mapping[str, Ports], fixed: Mapping[Ports, Iterable[str]]) -> list[str]:
        """Replace the name list (reload, grants). New names are due at once; removed
        names lose their addresses at the next apply. Returns the new names."""
        added = [n for n in names if n not in self.names]
        for gone in [n for n in self.names if n not in names]:
            del self.names[gone]
        for name, ports in names.items():
            state = self.names.get(name)
            if state is None:
                self.names[name] = NameState(name, tuple(ports))
            else:
                state.ports = tuple(ports)
        self.fixed = {tuple(p): tuple(a) for p, a in fixed.items()}
        return added

    def clamp(self, ttl: int | None) -> float:
        if ttl is None:
            return self.min_ttl
        return min(self.max_ttl, max(self.min_ttl, float(ttl)))

    # -- what the sets hold ----------------------------------------------------------

    def contents(self) -> Contents:
        """Static set contents per port group: fixed ranges plus every live address."""
        out: dict[Ports, set[str]] = {p: set(a) for p, a in self.fixed.items()}
        for state in self.names.values():
            out.setdefault(state.ports, set()).update(state.seen)
        return {p: tuple(sorted(a)) for p, a in out.items()}

    def address_count(self) -> int:
        return len({a for s in self.names.values() for a in s.seen})

    def names_for(self, addr: str) -> list[str]:
        """Names an address was resolved from (within the grace period)."""
        return sorted(s.name for s in self.names.values() if addr in s.seen)

    def failing(self) -> list[NameState]:
        return sorted((s for s in self.names.values() if s.error), key=lambda s: s.name)

    def next_deadline(self) -> float | None:
        return min((s.due for s in self.names.values()), default=None)

    # -- one tick --------------------------------------------------------------------

    async def tick(self, names: Sequence[str] | None = None, *, force: bool = False) -> TickReport:
        async with self.lock:
            return await self.tick_locked(names, force=force)

    def _due(self, names: Sequence[str] | None) -> list[NameState]:
        if names is not None:
            return [self.names[n] for n in dict.fromkeys(names) if n in self.names]
        deadline = self.next_deadline()
        if deadline is None:
            return []
        horizon = max(deadline, self.clock()) + self.window
        return [s for s in self.names.values() if s.due <= horizon]

    async def tick_locked(
        self, names: Sequence[str] | None = None, *, force: bool = False
    ) -> TickReport:
        """Resolve the due names (or ``names``), update, apply if anything changed."""
        t0 = self.clock()
        due = self._due(names)
        results: Mapping[str, Resolution] = {}
        if due:
            results = await self.resolve([s.name for s in due])
        now = self.clock()
        failed = [s for s in due if (r := results.get(s.name)) is None or r.error is not None]
        report = TickReport(
            at=self.wall(), duration_s=0.0, names=len(due), ok=len(due) - len(failed),
            failed=len(failed), addresses=0, changed=False, applied=False,
        )
        self.ticks += 1
        if due and len(failed) == len(due):
            # Upstream (or our server) is down: keep everything exactly as it is.
            first = results.get(due[0].name)
            why = first.error if first is not None else "no answer"
            self.degraded = f"all {len(due)} lookups failed ({due[0].name}: {why}); firewall unchanged"
            for s in due:
                self._failed(s, results.get(s.name), now)
                self._schedule(s, self.min_ttl, now)
            report.all_failed = True
            report.error = self.degraded
            report.addresses = self.address_count()
            log.warning("network_degraded", reason=self.degraded)
            return self._finish(report, t0)
        for s in due:
            r = results.get(s.name)
            if r is None or r.error is not None:
                self._failed(s, r, now)
                for addr in s.last_good:
                    s.seen[addr] = now
                self._schedule(s, self.min_ttl, now)
            else:
                if s.error is not None:
                    log.info("refresh_name_recovered", name=s.name, failures=s.failures)
                s.error, s.failures, s.failing_since = None, 0, None
                public = tuple(a for a in r.addresses if not is_internal(a))
                if len(public) != len(r.addresses):
                    log.warning("refresh_internal_address_ignored", name=s.name,
                                addresses=sorted(set(r.addresses) - set(public))[:10])
                s.last_good, s.ttl, s.last_ok = public, r.ttl, self.wall()
                for addr in public:
                    s.seen[addr] = now
                self._schedule(s, self.clamp(r.ttl), now)
        expired = 0
        for s in self.names.values():
            old = [a for a, t in s.seen.items() if now - t > self.grace]
            for a in old:
                del s.seen[a]
            expired += len(old)
        contents = self.contents()
        report.addresses = self.address_count()
        report.changed = contents != self.applied
        if report.changed or force or self._retry_apply:
            try:
                await self.apply_fn(contents)
            except Exception as exc:
                # The old sets stay in place (the transaction did not happen): retry next tick.
                self._retry_apply = True
                report.error = f"firewall update failed: {exc}"
                self.degraded = report.error
                log.error("refresh_apply_failed", error=str(exc)[:500])
                return self._finish(report, t0)
            self.applied = contents
            self.applies += 1
            self._retry_apply = False
            report.applied = True
        if self.degraded is not None:
            log.info("network_recovered", previous=self.degraded)
        self.degraded = None
        if report.changed or expired:
            log.info("refresh_applied", names=report.names, ok=report.ok, failed=report.failed,
                     addresses=report.addresses, expired=expired)
        return self._finish(report, t0)

    def _failed(self, s: NameState, r: Resolution | None, now: float) -> None:
        s.error = (r.error if r is not None else None) or "no answer"
        s.failures += 1
        if s.failing_since is None:
            s.failing_since = self.wall()
        if s.failures == 1:
            log.warning("refresh_name_failed", name=s.name, error=s.error,
                        kept=len(s.last_good))

    def _schedule(self, s: NameState, interval: float, now: float) -> None:
        # From the deadline, not from when the work ended (no drift); an early refresh
        # (reload, grant) starts a new cycle now.
        base = s.due if 0 < s.due <= now else now
        nxt = base + interval
        if nxt <= now:
            self.overruns += 1
            log.warning("refresh_overrun", name=s.name, late_s=round(now - nxt, 3),
                        interval_s=interval)
            nxt = now + interval
        s.due = nxt

    def _finish(self, report: TickReport, t0: float) -> TickReport:
        report.duration_s = self.clock() - t0
        self.last = report
        return report

    # -- the task --------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: sleep to the earliest deadline, refresh what is due."""
        while True:
            deadline = self.next_deadline()
            if deadline is None:
                await self.sleep(self.max_ttl)
                continue
            left = deadline - self.clock()
            if left > 0:
                await self.sleep(left)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not end the safety net: log it and try again after the floor.
                log.exception("refresh_crashed")
                await self.sleep(self.min_ttl)

    def figures(self) -> RefreshFigures:
        """For status: last tick, next deadline, failing names, counters."""
        nxt = self.next_deadline()
        return {
            "names": len(self.names),
            "addresses": self.address_count(),
            "last_refresh": self.last.as_dict() if self.last else None,
            "next_refresh_in_s": None if nxt is None else round(max(0.0, nxt - self.clock()), 3),
            "refreshes": self.ticks,
            "set_swaps": self.applies,
            "overruns": self.overruns,
            "failing": [
                {"name": s.name, "error": s.error, "failures": s.failures,
                 "since": s.failing_since, "kept": list(s.last_good)}
                for s in self.failing()
            ],
        }
