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
    from codetainer.status import GrantStatus, RefusedName

_REPLY = re.compile(r"\breply (?P<name>[a-zA-Z0-9.-]{1,253}) is (?P<addr>[0-9a-fA-F.:]{2,45})\s*$")


@dataclass
class NetworkSetup:
    """The network as the ``network-config`` step set it up: one value, every part
    present. Reload and grants replace ``base``/``plan``/``github`` in place (under the
    refresh lock), never with ``None``."""

    opts: NetOptions
    backend: FirewallBackend
    #: the allowlist as loaded (file + ``CODETAINER_ALLOW``), without temporary grants
    base: Allowlist
    #: the plan in force: ``base`` plus the grants
    plan: NetworkPlan
    #: GitHub's published ranges, when an ``@github`` entry asked for them
    github: GithubRanges | None = None


class ActiveNetwork(Protocol):
    """What ``why``, ``allow`` and status read of the network. ``net`` (options, backend,
    allowlist, plan) is ``None`` until ``network-config`` has run, and every part the
    later steps add is ``None`` until its step has (``hook`` at ``dns``, ``refresher`` at
    ``firewall``, ...)."""

    @property
    def net(self) -> NetworkSetup | None:
        """The setup of the ``network-config`` step; ``None`` before it ran."""
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
        self.rows: OrderedDict[str, RefusedName] = OrderedDict()
        self.total = 0

    def record(self, name: str, client: str = "", qtype: str = "", when: float | None = None) -> None:
        self.total += 1
        now = when or time.time()
        row: RefusedName = self.rows.pop(name) if name in self.rows else {
            "name": name, "count": 0, "first": now, "last": now, "client": client}
        row["count"] += 1
        row["last"] = now
        row["client"] = client
        if qtype:
            row["qtype"] = qtype
        self.rows[name] = row
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)

    def get(self, name: str) -> RefusedName | None:
        row = self.rows.get(name)
        return row.copy() if row else None

    def top(self, n: int = 10) -> list[RefusedName]:
        return [r.copy() for r in sorted(self.rows.values(), key=lambda r: (-r["count"], -r["last"]))[:n]]


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

    def as_dict(self) -> GrantStatus:
        return {
            "target": str(self.entry),
            "kind": self.entry.kind.value,
            "expires_at": self.expires_at,
            "expires_in_s": round(max(0.0, self.expires_at - time.time()), 1),
            "by_uid": self.by_uid,
        }
