"""The active network as its readers see it.

The controller (:mod:`.controller`) sets the network up and keeps it; ``why``, ``allow``
(:mod:`.ops`) and the status section (:mod:`.why`) only read it. What they read is the
narrow interface :class:`ActiveNetwork`, which the controller implements, so those
readers never import the controller (no import circle in ``network/``). Here too are
the live tables the controller fills and they read: refused DNS names, the name an
address was handed out for, temporary grants. All tables are bounded (least recently
touched entries go first), so a client that asks for a million random names cannot
grow the daemon.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from codetainer.network.allowlist import Entry

if TYPE_CHECKING:
    from codetainer.network.allowlist import Allowlist
    from codetainer.network.compose import NetOptions, NetworkPlan
    from codetainer.network.dnscheck import HealthResult
    from codetainer.network.dnsguard import DnsGuard
    from codetainer.network.dnshook import DnsHook
    from codetainer.network.firewall import Denied, FirewallBackend, SelfTestResult
    from codetainer.network.github_meta import GithubRanges
    from codetainer.network.refresh import Refresher

_REPLY = re.compile(r"\breply (?P<name>[a-zA-Z0-9.-]{1,253}) is (?P<addr>[0-9a-fA-F.:]{2,45})\s*$")


class ActiveNetwork(Protocol):
    """What ``why``, ``allow`` and status read of the network. Each part is ``None``
    until the boot step that makes it has run (``opts``, ``backend`` and ``plan`` at
    ``network-config``, ``refresher`` at ``firewall``, ...)."""

    @property
    def opts(self) -> NetOptions | None: ...
    @property
    def backend(self) -> FirewallBackend | None: ...
    @property
    def plan(self) -> NetworkPlan | None: ...
    @property
    def github(self) -> GithubRanges | None: ...
    @property
    def refresher(self) -> Refresher | None: ...
    @property
    def hook(self) -> DnsHook | None: ...
    @property
    def guard(self) -> DnsGuard | None: ...
    @property
    def health(self) -> HealthResult | None: ...
    @property
    def selftest(self) -> SelfTestResult | None: ...
    @property
    def denied(self) -> Sequence[Denied]:
        """What the firewall denied, as last read (``denied_at``, wall clock)."""
    @property
    def denied_at(self) -> float | None: ...
    @property
    def refused(self) -> RefusedTable: ...
    @property
    def addr_names(self) -> AddressNames: ...
    @property
    def grants(self) -> Mapping[str, Grant]:
        """The temporary grants, expired or not yet revoked included."""

    def effective(self) -> Allowlist:
        """The allowlist in force: the plan's (grants included), else the base one."""

    def degraded(self) -> str | None:
        """Why the network is degraded (status ``degraded`` and the daemon's probe), or
        ``None``; ``None`` too while it is not set up."""

    async def read_denied(self) -> list[Denied]:
        """Read the firewall's denied counters now."""

    async def rebuild(self, reason: str) -> dict[str, Any]:
        """Re-plan with the grants in force and apply it; the result of ``allow``."""


class RefusedTable:
    """Names the DNS server refused: name -> count, last time, last client and type."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.total = 0

    def record(self, name: str, client: str = "", qtype: str = "", when: float | None = None) -> None:
        self.total += 1
        row = self.rows.pop(name, None) or {"name": name, "count": 0, "first": when or time.time()}
        row["count"] += 1
        row["last"] = when or time.time()
        row["client"] = client
        if qtype:
            row["qtype"] = qtype
        self.rows[name] = row
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)

    def get(self, name: str) -> dict[str, Any] | None:
        row = self.rows.get(name)
        return dict(row) if row else None

    def top(self, n: int = 10) -> list[dict[str, Any]]:
        return [dict(r) for r in sorted(self.rows.values(), key=lambda r: (-r["count"], -r["last"]))[:n]]


class AddressNames:
    """The name an address was last handed out for (from the DNS server's replies)."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self.rows: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def record(self, addr: str, name: str, when: float | None = None) -> None:
        self.rows.pop(addr, None)
        self.rows[addr] = (name, when or time.time())
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)

    def get(self, addr: str) -> tuple[str, float] | None:
        return self.rows.get(addr)

    def feed_dnsmasq(self, line: str) -> None:
        """``… reply NAME is ADDR`` lines of dnsmasq's ``log-queries=extra``."""
        m = _REPLY.search(line)
        if m and ("." in m["addr"] or ":" in m["addr"]) and any(c.isdigit() for c in m["addr"]):
            self.record(m["addr"], m["name"].lower())


@dataclass
class Grant:
    """A temporary allowlist entry (``codetainer allow NAME --for 2h``)."""

    entry: Entry
    expires_at: float  # wall clock
    expires_mono: float
    by_uid: int
    granted_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.entry),
            "kind": self.entry.kind.value,
            "expires_at": self.expires_at,
            "expires_in_s": round(max(0.0, self.expires_at - time.time()), 1),
            "by_uid": self.by_uid,
        }
