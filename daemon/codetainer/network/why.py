"""Visibility: what ``codetainer why HOST|IP|URL`` answers, and the network section of
status, as data (:mod:`codetainer.status`); the CLI renders them (``cli/render.py``:
``render_why``, ``render_network``). Both read the network through
:class:`.active.ActiveNetwork`, never the controller; the tables they show (refused
names, address names, grants) live in :mod:`.active`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from codetainer.network.active import ActiveNetwork
from codetainer.network.model import is_internal

if TYPE_CHECKING:
    from codetainer.status import (
        DeniedRow,
        GrantStatus,
        NetworkActive,
        NetworkStatus,
        ProxyRefusal,
        RefreshFigures,
        RefusedName,
        WhyDenied,
        WhyReply,
        WhyRequest,
    )

_DURATION = re.compile(r"([0-9]{1,6})([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_GRANT_S = 7 * 86400


def parse_duration(text: str) -> float:
    """``30m``, ``2h``, ``1d``, ``90`` (seconds) -> seconds; ``ValueError`` says why not."""
    m = _DURATION.match(str(text).strip().lower())
    if not m:
        raise ValueError(f"duration {str(text)[:20]!r}: use a number with s, m, h or d (30m, 2h, 1d)")
    seconds = int(m[1]) * _UNITS[m[2]]
    if not 0 < seconds <= MAX_GRANT_S:
        raise ValueError(f"duration {text!r} must be between 1s and 7d")
    return float(seconds)


@dataclass
class WhyAddress:
    addr: str
    sets: list[str]
    denied: list[WhyDenied]
    names: list[str]

    @property
    def internal(self) -> bool:
        return is_internal(self.addr)

    @property
    def allowed(self) -> bool:
        # A DNS-filled (dynamic) set does not open an internal address: the firewall
        # screens those before it looks at the dynamic sets.
        kinds = "s" if self.internal else "sd"
        return any(s[0] in kinds and s[1] in "46" for s in self.sets)


@dataclass
class WhyReport:
    target: str
    kind: str  # "host" or "ip"
    entry: str | None
    where: str | None
    rcode: str | None = None
    addresses: list[WhyAddress] = field(default_factory=list)
    refused: RefusedName | None = None
    grant: GrantStatus | None = None
    notes: list[str] = field(default_factory=list)
    #: ``why URL``: the proxy's decision per method, and what it refused for this host
    requests: list[WhyRequest] = field(default_factory=list)
    proxy_refused: list[ProxyRefusal] = field(default_factory=list)

    def verdict(self) -> str:
        if self.kind == "host":
            if self.entry is None:
                return "NOT ALLOWED: no allowlist entry matches this name (DNS answers NXDOMAIN)"
            if self.addresses and all(a.allowed for a in self.addresses):
                return "ALLOWED: every address it resolves to is in an allowed set"
            if self.addresses:
                return "PARTLY ALLOWED: some addresses are not in a set yet (see below)"
            return f"ALLOWLISTED, but it does not resolve now ({self.rcode or 'no answer'})"
        if self.addresses and self.addresses[0].allowed:
            return "ALLOWED: the address is in an allowed set"
        return "NOT ALLOWED: the address is in no allowed set"

    def as_dict(self) -> WhyReply:
        """The ``why`` reply: data only; ``codetainer why`` renders it (``render_why``)."""
        return {
            "target": self.target,
            "kind": self.kind,
            "verdict": self.verdict(),
            "allowlisted": self.entry is not None,
            "entry": self.entry,
            "where": self.where,
            "rcode": self.rcode,
            "addresses": [
                {"addr": a.addr, "sets": a.sets, "allowed": a.allowed, "denied": a.denied,
                 "names": a.names}
                for a in self.addresses
            ],
            "refused": self.refused,
            "grant": self.grant,
            "notes": self.notes,
            "requests": self.requests,
            "proxy_refused": self.proxy_refused,
        }


def denied_rows(denied: Sequence[Any], addr: str) -> list[WhyDenied]:
    return [
        {"proto": d.proto, "port": d.port, "packets": d.packets, "seen_ago": round(d.seen_ago, 1),
         "seen": d.seen}
        for d in denied if d.addr == addr
    ]


def name_of(nc: ActiveNetwork, addr: str) -> str | None:
    """The name an address was last handed out for (DNS server log or hook), else one
    the refresh resolved it from."""
    last = nc.addr_names.get(addr)
    if last:
        return last[0]
    names = nc.refresher.names_for(addr) if nc.refresher else []
    return names[0] if names else None


def network_status(nc: ActiveNetwork) -> NetworkStatus:
    """The ``network`` section of status (``render_network`` in the CLI shows it)."""
    net = nc.net
    if net is None:
        return {"active": False}
    opts = net.opts
    fig: RefreshFigures = nc.refresher.figures() if nc.refresher else {
        "names": len(net.plan.names), "addresses": 0,
        "last_refresh": None, "next_refresh_in_s": None, "refreshes": 0, "set_swaps": 0,
        "overruns": 0, "failing": []}
    read_at = nc.denied_at or time.time()  # seen_ago counts from the kernel read
    denied: list[DeniedRow] = [
        {"addr": d.addr, "port": d.port, "proto": d.proto, "packets": d.packets,
         "last_seen": round(read_at - d.seen_ago, 1), "seen": d.seen, "name": name_of(nc, d.addr)}
        for d in nc.denied[:10]
    ]
    out: NetworkActive = {
        "active": True,
        "engine": opts.engine.value,
        "listen": opts.listen,
        "hook": nc.hook.address if nc.hook else None,
        "backend": net.backend.name,
        "ipv6": opts.ipv6,
        "ipv6_reason": opts.ipv6_why,
        "inbound": ",".join(str(p) for p in opts.inbound),
        "names": fig["names"], "addresses": fig["addresses"],
        "last_refresh": fig["last_refresh"], "next_refresh_in_s": fig["next_refresh_in_s"],
        "refreshes": fig["refreshes"], "set_swaps": fig["set_swaps"],
        "overruns": fig["overruns"], "failing": fig["failing"],
        "denied": denied,
        "refused": nc.refused.top(10),
        "grants": [g.as_dict() for g in nc.grants.values()],
        "degraded": nc.degraded(),
        "selftest_ok": None if nc.selftest is None else nc.selftest.ok,
        "dns_health": None if nc.health is None else {
            "ok": nc.health.ok, "reason": nc.health.reason,
            "latency_ms": round(nc.health.latency * 1000, 1)},
        "dns_guard": None if nc.guard is None else nc.guard.status(),
    }
    if nc.hook is not None:
        out["hook_counts"] = dict(nc.hook.counts)
    return out
