"""The allowlist's DNS side as data: for each domain, what is answered there and which
dynamic sets (hence which ports) its answers open.

One value, :class:`DnsPlan`, is built from the allowlist once; everything that needs
"which sets does this name fill" reads it, never a rendered config:

* both DNS engines' configs are rendered from it (:mod:`.dnsconfig`: dnsmasq's
  ``server=``/``local=``/``nftset=``/``ipset=`` lines, CoreDNS's server blocks);
* the CoreDNS forwarding hook routes answers with :attr:`DnsPlan.domain_sets` (longest
  matching domain, as dnsmasq's ``nftset=`` does);
* the firewall policy gets one port group per distinct set (:attr:`DnsPlan.dynamic_sets`),
  and the refresh task the ports of each exact name (:meth:`DnsPlan.ports_of`).

Domain semantics (dnsmasq's, which CoreDNS's blocks reproduce): a domain gets the union of
the ports of the entries that meet there, an exact name and a wildcard over it; a domain
under a wider wildcard is routed to its own lines (longest match) even for names the wider
wildcard is what allows, so it is forwarded there with its subdomains, and its set gets that
wildcard's ports too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

from codetainer.network.allowlist import Allowlist, EntryKind
from codetainer.network.model import INTERNAL, IPNetwork, Ports, dynamic_set, ipset_name


@dataclass(frozen=True)
class DynamicSet:
    """A kernel set the DNS server (or the hook) writes; it must exist before it starts."""

    family: int
    ports: Ports

    @property
    def name(self) -> str:
        """nftables set name in table ``inet codetainer`` (``d4_80_443``)."""
        return dynamic_set(self.family, self.ports)

    @property
    def ipset(self) -> str:
        """The iptables backend's ipset name (``ct-d4_80_443``)."""
        return ipset_name(self.name)


@dataclass(frozen=True)
class DomainRoute:
    """Everything the allowlist says about one DNS domain (exact and/or wildcard)."""

    name: str
    #: the name itself is allowed (exact entry, or a wider wildcard covers it)
    apex: bool
    #: its subdomains are allowed (wildcard entry here or above)
    subs: bool
    #: sorted ports its answers open (the union of the entries that meet here)
    ports: Ports
    #: the dynamic sets its answers go to: IPv4, and IPv6 when AAAA answers are allowed
    sets: tuple[DynamicSet, ...]
    #: where the entries come from (``domains.conf:3, domains.conf:9``), for comments
    where: str


def set_timeout_for(max_ttl: int) -> int:
    """Element timeout of the dynamic sets: a client told ``max_ttl`` at t0 may use the
    address until t0 + 2*max_ttl (the cache's copy expires at most max_ttl later), plus a
    minute."""
    return 2 * max_ttl + 60


def _safe_comment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ._:/-]", "?", text)[:200]


@dataclass(frozen=True)
class DnsPlan:
    """The allowlist's domains in file order, with what is answered and filled there."""

    routes: tuple[DomainRoute, ...]
    #: answers with an address in these become NXDOMAIN before any set is filled
    screened: tuple[IPNetwork, ...]
    #: AAAA answers are allowed (their addresses go to the ``d6_`` sets)
    ipv6: bool

    @classmethod
    def build(cls, allowlist: Allowlist, *, ipv6: bool) -> DnsPlan:
        entries: dict[str, list[str]] = {}
        ports: dict[str, set[int]] = {}
        apex: dict[str, bool] = {}
        subs: dict[str, bool] = {}
        for e in allowlist.entries:
            if e.kind not in (EntryKind.HOST, EntryKind.WILDCARD):
                continue
            d = e.domain
            entries.setdefault(d, []).append(_safe_comment(e.where))
            ports.setdefault(d, set()).update(e.ports)
            apex[d] = apex.get(d, False) or e.kind is EntryKind.HOST
            subs[d] = subs.get(d, False) or e.kind is EntryKind.WILDCARD
        routes = []
        for d, where in entries.items():
            cover = allowlist.covering_wildcard(d)
            if cover is not None:
                apex[d] = subs[d] = True
                ports[d].update(cover.ports)
            key = tuple(sorted(ports[d]))
            sets = (DynamicSet(4, key),) + ((DynamicSet(6, key),) if ipv6 else ())
            routes.append(DomainRoute(d, apex[d], subs[d], key, sets, ", ".join(where)))
        return cls(tuple(routes), screened_networks(allowlist), ipv6)

    @property
    def domain_sets(self) -> dict[str, tuple[str, ...]]:
        """``{domain: (set names)}``: the hook's routing table."""
        return {r.name: tuple(s.name for s in r.sets) for r in self.routes}

    @property
    def dynamic_sets(self) -> tuple[DynamicSet, ...]:
        """Every dynamic set some domain fills, once each, in first-use order."""
        return tuple(dict.fromkeys(s for r in self.routes for s in r.sets))

    def route(self, domain: str) -> DomainRoute | None:
        return self._by_name.get(domain)

    def ports_of(self, name: str) -> Ports | None:
        """The ports an exact allowlisted name's addresses open (its own domain's)."""
        r = self.route(name)
        return r.ports if r is not None else None

    @cached_property
    def _by_name(self) -> Mapping[str, DomainRoute]:
        return {r.name: r for r in self.routes}


_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _minus(net: _Net, holes: Iterable[_Net]) -> list[_Net]:
    """``net`` without the addresses of ``holes``, in as few networks as it takes."""
    parts = [net]
    for hole in holes:
        rest: list[_Net] = []
        for part in parts:
            if not part.overlaps(hole):
                rest.append(part)
            elif part.prefixlen < hole.prefixlen:  # the hole is inside: keep the rest
                rest.extend(part.address_exclude(hole))
            # else the hole covers all of the part
        parts = rest
    return sorted(parts)


def screened_networks(allowlist: Allowlist) -> tuple[IPNetwork, ...]:
    """Where a DNS answer may not point: ``model.INTERNAL``, less what an explicit CIDR
    entry opens (the firewall allows those addresses by number anyway, so answering a
    name with one gives nothing away, and a name the operator allowed together with its
    internal network keeps resolving)."""
    v4 = [n for n in allowlist.cidrs if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in allowlist.cidrs if isinstance(n, ipaddress.IPv6Network)]
    out: list[IPNetwork] = []
    for text in INTERNAL[4]:
        out += _minus(ipaddress.IPv4Network(text), v4)
    for text in INTERNAL[6]:
        out += _minus(ipaddress.IPv6Network(text), v6)
    return tuple(out)
