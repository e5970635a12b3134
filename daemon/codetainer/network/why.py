"""Visibility: ``codetainer why HOST|IP|URL`` rendered as one screen, and the network
section of status. Both read the network through :class:`.active.ActiveNetwork`, never
the controller; the tables they show (refused names, address names, grants) live in
:mod:`.active`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from codetainer.network.active import ActiveNetwork
from codetainer.network.model import is_internal

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


def ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{span(seconds)} ago"


def span(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class WhyAddress:
    addr: str
    sets: list[str]
    denied: list[dict[str, Any]]
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
    refused: dict[str, Any] | None = None
    grant: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: ``why URL``: the proxy's decision per method, and what it refused for this host
    requests: list[dict[str, Any]] = field(default_factory=list)
    proxy_refused: list[dict[str, Any]] = field(default_factory=list)

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

    def text(self) -> str:
        out = [f"{self.target}: {self.verdict()}"]
        if self.entry is not None:
            out.append(f"  allowlist: {self.entry} ({self.where})")
        elif self.kind == "host":
            out.append("  allowlist: no entry (add it to domains.conf, or `codetainer allow NAME`)")
        if self.grant is not None:
            out.append(f"  temporary grant: expires in {span(self.grant['expires_in_s'])}")
        if self.kind == "host":
            if self.addresses:
                out.append(f"  resolves to: {', '.join(a.addr for a in self.addresses)}")
            elif self.rcode:
                out.append(f"  resolves to: nothing ({self.rcode})")
        for a in self.addresses:
            sets = ", ".join(a.sets) if a.sets else "no set"
            line = f"  {a.addr}: {sets}"
            if a.internal and not a.allowed:
                line += " (internal address: a name never opens it, only an explicit network entry)"
            if a.names and self.kind == "ip":
                line += f"; resolved from {', '.join(a.names)}"
            out.append(line)
            for d in a.denied[:5]:
                seen = d.get("seen", "last")
                when = ago(d["seen_ago"])
                out.append(f"    denied {d['packets']}x {d['proto']}/{d['port']}, {seen} {when}")
        if self.refused is not None:
            r = self.refused
            out.append(f"  DNS refused it {r['count']}x, last {ago(time.time() - r['last'])}")
        for q in self.requests:
            verdict = "allowed" if q["allowed"] else "REFUSED"
            by = q["where"] or "no allowlist entry"
            cred = ", the proxy adds the credential" if q.get("credential") else ""
            out.append(f"  proxy: {q['method']} {q['url']}: {verdict} by {by} {q['rule']}{cred}")
            if q.get("reason"):
                out.append(f"    {q['reason']}")
        for r in self.proxy_refused[:5]:
            out.append(f"  proxy refused {r['method']} {r['host']}{r['path']} {r['count']}x, "
                       f"last {ago(time.time() - r['last'])}: {r.get('where') or 'no entry'}")
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out[:24])

    def as_dict(self) -> dict[str, Any]:
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
            "text": self.text(),
        }


def denied_rows(denied: Sequence[Any], addr: str) -> list[dict[str, Any]]:
    return [
        {"proto": d.proto, "port": d.port, "packets": d.packets, "seen_ago": round(d.seen_ago, 1),
         "seen": d.seen}
        for d in denied if d.addr == addr
    ]


def status_text(st: dict[str, Any]) -> str:
    lines = [f"DNS {st['engine']} on {st['listen']}"
             + (f" (hook {st['hook']})" if st.get("hook") else "")
             + f", firewall {st['backend']}, IPv6 {st['ipv6']}"
             + (f" ({st['ipv6_reason']})" if st.get("ipv6_reason") else "")
             + f", inbound {st.get('inbound') or 'none'}"]
    last = st.get("last_refresh")
    refresh = f"{st['names']} names, {st['addresses']} addresses"
    if last:
        refresh += (f"; last refresh {ago(time.time() - last['at'])} in {last['duration_s'] * 1000:.0f} ms "
                    f"({last['ok']} ok, {last['failed']} failed)")
    if st.get("next_refresh_in_s") is not None:
        refresh += f"; next in {st['next_refresh_in_s']:.0f}s"
    lines.append(refresh)
    if st.get("degraded"):
        lines.append(f"DEGRADED: {st['degraded']}")
    guard = st.get("dns_guard") or {}
    if guard.get("revivals"):
        lines.append(f"DNS server: {guard['revivals']} start(s) by codetainerd after the supervisor "
                     f"gave up; answered again after {guard['recoveries']} outage(s)")
    if st.get("failing"):
        lines.append("failing: " + ", ".join(f"{f['name']} ({f['error']} x{f['failures']})"
                                             for f in st["failing"][:5]))
    for d in st.get("denied", [])[:5]:
        name = f" ({d['name']})" if d.get("name") else ""
        lines.append(f"denied {d['addr']}:{d['port']}/{d['proto']}{name} x{d['packets']}, "
                     f"{d.get('seen', 'last')} {ago(time.time() - d['last_seen'])}")
    for r in st.get("refused", [])[:5]:
        lines.append(f"refused {r['name']} x{r['count']}, last {ago(time.time() - r['last'])}")
    for g in st.get("grants", []):
        lines.append(f"grant {g['target']}: expires in {span(g['expires_in_s'])}")
    return "\n".join(lines)


def name_of(nc: ActiveNetwork, addr: str) -> str | None:
    """The name an address was last handed out for (DNS server log or hook), else one
    the refresh resolved it from."""
    last = nc.addr_names.get(addr)
    if last:
        return last[0]
    names = nc.refresher.names_for(addr) if nc.refresher else []
    return names[0] if names else None


def network_status(nc: ActiveNetwork) -> dict[str, Any]:
    """The ``network`` section of status; includes ``text`` for the human renderer."""
    if nc.opts is None or nc.backend is None:
        return {"active": False, "text": "not set up (the network boot steps did not run)"}
    fig = nc.refresher.figures() if nc.refresher else {
        "names": len(nc.plan.names) if nc.plan else 0, "addresses": 0,
        "last_refresh": None, "next_refresh_in_s": None, "refreshes": 0, "overruns": 0,
        "failing": []}
    read_at = nc.denied_at or time.time()  # seen_ago counts from the kernel read
    denied = [
        {"addr": d.addr, "port": d.port, "proto": d.proto, "packets": d.packets,
         "last_seen": round(read_at - d.seen_ago, 1), "seen": d.seen, "name": name_of(nc, d.addr)}
        for d in nc.denied[:10]
    ]
    out: dict[str, Any] = {
        "active": True,
        "engine": nc.opts.engine.value,
        "listen": nc.opts.listen,
        "hook": nc.hook.address if nc.hook else None,
        "backend": nc.backend.name,
        "ipv6": nc.opts.ipv6,
        "ipv6_reason": nc.opts.ipv6_why,
        "inbound": ",".join(str(p) for p in nc.opts.inbound),
        **fig,
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
    out["text"] = status_text(out)
    return out
