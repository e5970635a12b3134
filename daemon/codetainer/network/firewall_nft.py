"""nftables backend: our own table ``inet codetainer`` and nothing else.

Apply is one ``nft -f`` transaction that creates or updates the table in place: chains
are flushed and refilled, static sets flushed and refilled, the dynamic sets (filled by
the DNS server) and the denied-destination set are declared with ``add`` and keep their
elements. So a reload neither opens a window nor forgets an address the DNS server
handed out, and conntrack entries (hence established connections) are untouched. Only
when the table in the kernel cannot be updated in place (a set of ours with another
type, left by an older version) is it deleted and recreated, still in one transaction,
carrying the dynamic sets' elements over with their remaining lifetime.

A refresh touches the static sets only: ``flush set`` + ``add element`` for every set,
one transaction.

With the policy proxy on, a nat chain (``to_proxy``, hook output, priority -100, so before
the filter) redirects the agent's TCP to ports 80/443 of allowed addresses (the same sets
as the filter's) to the proxy's transparent port on loopback; the filter refuses the
agent's 80/443 that was not redirected. The agent's queries to the local DNS server are
bounded (name length, one rate for UDP and TCP) before the loopback accept.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from codetainer.network import model
from codetainer.network.firewall_base import (
    Denied,
    FirewallBackend,
    FirewallError,
    FirewallStatus,
    member_of,
)
from codetainer.network.firewall_policy import (
    PROXIED_PORTS,
    DnsLimit,
    FirewallPolicy,
    parse_address,
    rendered,
)
from codetainer.network.model import IPNetwork

log = structlog.get_logger("codetainer.network")

T = f"{model.FAMILY} {model.TABLE}"
CHAINS = ("input", "output", "deny")
#: the nat chain of the policy proxy's redirect (``redirect`` itself is a keyword)
PROXY_CHAIN = "to_proxy"
DENIED_SETS = {4: "denied4", 6: "denied6"}
UPSTREAM_SETS = {4: "upstream4", 6: "upstream6"}
_ND = "{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }"
_MLD = "{ mld-listener-report, mld-listener-done, mld2-listener-report }"
_ND_IN = "{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }"


def _type(version: int) -> str:
    return "ipv4_addr" if version == 4 else "ipv6_addr"


def _elements(values: Iterable[Any]) -> str:
    return ", ".join(rendered(v) for v in values)


def _ports(ports: tuple[int, ...]) -> str:
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(str(p) for p in ports) + " }"


def set_definitions(policy: FirewallPolicy) -> dict[str, str]:
    """Every set of the policy: name -> its ``{ ... }`` declaration (without elements)."""
    defs: dict[str, str] = {}
    for v in (4, 6):
        defs[UPSTREAM_SETS[v]] = f"{{ type {_type(v)}; }}"
    for g in policy.groups:
        s4, d4, s6, d6 = g.set_names()
        for name, v in ((s4, 4), (s6, 6)):
            defs[name] = f"{{ type {_type(v)}; flags interval; }}"
        for name, v in ((d4, 4), (d6, 6)):
            defs[name] = f"{{ type {_type(v)}; flags timeout; timeout {policy.dynamic_timeout}s; }}"
    for v in (4, 6):
        defs[DENIED_SETS[v]] = (
            f"{{ type {_type(v)} . inet_proto . inet_service; flags dynamic,timeout; "
            f"timeout {policy.denied_timeout}s; counter; size {policy.denied_size}; }}"
        )
    return defs


def static_contents(policy: FirewallPolicy) -> dict[str, tuple[Any, ...]]:
    """Sets that are flushed and refilled from the policy on apply."""
    out: dict[str, tuple[Any, ...]] = {
        UPSTREAM_SETS[4]: policy.upstreams_of(4),
        UPSTREAM_SETS[6]: policy.upstreams_of(6),
    }
    for g in policy.groups:
        s4, _d4, s6, _d6 = g.set_names()
        out[s4] = g.v4
        out[s6] = g.v6
    return out


def _fill(name: str, values: tuple[Any, ...]) -> list[str]:
    lines = [f"flush set {T} {name}"]
    if values:
        lines.append(f"add element {T} {name} {{ {_elements(values)} }}")
    return lines


def render_rules(policy: FirewallPolicy) -> list[str]:
    """The ``add rule`` lines of every chain (output, input, deny), in evaluation order."""
    uid = policy.dns_uid
    out: list[str] = []

    def rule(chain: str, text: str) -> None:
        out.append(f"add rule {T} {chain} {text}")

    if policy.dns_hook is not None:
        # The hook answers allowlisted names and fills the dynamic sets: the DNS server's
        # alone. Before the loopback accept; socketless packets do not match (skuid breaks).
        addr, port = policy.dns_hook
        daddr = "ip daddr" if addr.version == 4 else "ip6 daddr"
        rule("output", f"meta l4proto {{ tcp, udp }} {daddr} {rendered(addr)} th dport {port} "
             f"meta skuid != {uid} goto deny")
    if policy.dns_limit is not None and policy.agent_uid is not None:
        _render_dns_limit(policy.dns_limit, policy.agent_uid, rule)
    rule("output", 'oif "lo" accept')
    if policy.redirects:
        # A redirected connection: the hook's output device stays the one routed to
        # before the nat chain rewrote the destination, so `oif "lo"` does not see it.
        rule("output", f"tcp dport {policy.proxy_port} ip daddr 127.0.0.1 ct status dnat accept")
        rule("output", f"tcp dport {policy.proxy_port} ip6 daddr ::1 ct status dnat accept")
    # Neighbour discovery and multicast listener reports are link-local plumbing that
    # any IPv6 reply (even to inbound ssh) needs; their hop limits keep them on the link.
    rule("output", f"ip6 hoplimit 255 icmpv6 type {_ND} accept")
    rule("output", f"ip6 hoplimit 1 ip6 daddr ff02::/16 icmpv6 type {_MLD} accept")
    if policy.ipv6 == "fly":
        # Stateless on purpose: Fly's kernel has no IPv6 conntrack. `fly ssh console` dials
        # the Machine's 6PN address (flyctl: the machine's PrivateIP, port 22) through the
        # org's WireGuard tunnel, so the SSH server answers fdaa::/16 from port 22 (which
        # only root can bind). Fly's public range 2605:4c40::/32 (FLY_PUBLIC_IP: outbound
        # traffic, now NATed by the host; unsolicited inbound is refused by Fly) carries no
        # SSH: opening it would be agent egress to the Internet, so it stays closed.
        rule("output", f"ip6 daddr {rendered(policy.fly_network)} tcp sport 22 accept")
        rule(
            "output",
            f"meta skuid {uid} ip6 daddr {rendered(policy.fly_resolver)} "
            "meta l4proto { tcp, udp } th dport 53 accept",
        )
    # Answers on the published ports: only in connections opened from outside (reply
    # direction), which the input chain admitted on those ports alone. Before the UDP
    # screen, so a published UDP port can answer.
    for proto in ("tcp", "udp"):
        if ports := policy.inbound_ports(proto):
            rule("output", f"ct direction reply ct state established {proto} sport {_ports(ports)} accept")
    if policy.redirects:
        # The agent's HTTP(S) that the nat chain did not send to the proxy (after the
        # redirect its destination is loopback, accepted above) never goes direct: a
        # destination no entry allows is refused and recorded like any other.
        rule("output", f"meta skuid {policy.agent_uid} tcp dport {_ports(PROXIED_PORTS)} goto deny")
    # Before the conntrack shortcut: a conntrack entry outlives its socket, so another
    # uid that binds the DNS server's old source port would otherwise ride the entry of
    # an answered upstream query ("established") to the upstreams. No uid but the DNS
    # server's has any UDP off loopback; socketless packets do not match (skuid breaks).
    rule("output", f"meta l4proto udp meta skuid != {uid} goto deny")
    # Only the container's own connections (original direction): a connection opened from
    # outside gets no answer past here, whatever the input chain let in. ICMP errors the
    # container sends about its own connections' replies are related in this direction.
    rule("output", "ct direction original ct state established,related accept")
    rule("output", "ct state invalid drop")
    rule("output", f"meta skuid {uid} meta l4proto {{ tcp, udp }} th dport 53 ip daddr @upstream4 accept")
    if policy.upstreams_of(6):
        # A configured IPv6 upstream (Fly's resolver fdaa::3) is the DNS server's in any
        # IPv6 policy: it is configuration, not agent egress.
        rule(
            "output",
            f"meta skuid {uid} meta l4proto {{ tcp, udp }} th dport 53 ip6 daddr @upstream6 accept",
        )
    # Before any allow rule: outbound ssh stays denied even to an allowlisted address.
    rule("output", "tcp dport 22 goto deny")
    v6 = policy.ipv6 == "allowlist"
    # Static sets (explicit networks, addresses the refresh resolved and screened) first;
    # then no name-filled address may open an internal destination (model.INTERNAL);
    # then the dynamic sets the DNS server fills with whatever its upstream answered.
    for g in policy.groups:
        s4, _d4, s6, _d6 = g.set_names()
        rule("output", f"tcp dport {_ports(g.ports)} ip daddr @{s4} accept")
        if v6:
            rule("output", f"tcp dport {_ports(g.ports)} ip6 daddr @{s6} accept")
    rule("output", f"ip daddr {{ {', '.join(model.INTERNAL[4])} }} goto deny")
    if v6:
        rule("output", f"ip6 daddr {{ {', '.join(model.INTERNAL[6])} }} goto deny")
    for g in policy.groups:
        _s4, d4, _s6, d6 = g.set_names()
        rule("output", f"tcp dport {_ports(g.ports)} ip daddr @{d4} accept")
        if v6:
            rule("output", f"tcp dport {_ports(g.ports)} ip6 daddr @{d6} accept")
    rule("output", "goto deny")
    _render_input(policy, rule)
    if policy.log_denied:
        for v, daddr in ((4, "ip daddr"), (6, "ip6 daddr")):
            rule("deny", f"meta l4proto {{ tcp, udp }} update @{DENIED_SETS[v]} "
                 f"{{ {daddr} . meta l4proto . th dport }}")
            rule("deny", f"meta l4proto != {{ tcp, udp }} update @{DENIED_SETS[v]} "
                 f"{{ {daddr} . meta l4proto . 0 }}")
    rule("deny", "meta l4proto tcp reject with tcp reset")
    rule("deny", "reject with icmpx type admin-prohibited")
    return out


def _render_dns_limit(limit: DnsLimit, uid: int, rule: Callable[[str, str], None]) -> None:
    """The agent's queries to the local DNS server (before the loopback accept): a query
    with a name over the bound, and any packet past the shared UDP+TCP budget, dropped."""
    daddr = "ip daddr" if limit.server.version == 4 else "ip6 daddr"
    uids = (uid, *limit.also_uids)
    who = str(uid) if len(uids) == 1 else "{ " + ", ".join(map(str, uids)) + " }"
    to = f"meta skuid {who} {daddr} {rendered(limit.server)}"
    for proto in ("udp", "tcp"):
        rule("output", f"{to} {proto} dport {limit.port} meta length > {limit.max_length(proto)} "
             "counter drop")
    rule("output", f"{to} meta l4proto {{ tcp, udp }} th dport {limit.port} "
         f"limit rate over {limit.rate}/second burst {limit.burst} packets counter drop")


def render_redirect(policy: FirewallPolicy) -> list[str]:
    """The nat chain's rules: the agent's TCP to the proxied ports of allowed addresses
    goes to the proxy's transparent port. Same order as the output chain: static sets,
    the internal screen (no redirect: the filter denies and records it), dynamic sets."""
    if not policy.redirects:
        return []
    out: list[str] = []
    to = f"redirect to :{policy.proxy_port}"
    v6 = policy.ipv6 == "allowlist"

    def rule(text: str) -> None:
        out.append(f"add rule {T} {PROXY_CHAIN} {text}")

    for dynamic in (False, True):
        if dynamic:
            rule(f"ip daddr {{ {', '.join(model.INTERNAL[4])} }} return")
            if v6:
                rule(f"ip6 daddr {{ {', '.join(model.INTERNAL[6])} }} return")
        for g in policy.groups:
            if not (ports := policy.proxied(g)):
                continue
            s4, d4, s6, d6 = g.set_names()
            agent = f"meta skuid {policy.agent_uid} tcp dport {_ports(ports)}"
            rule(f"{agent} ip daddr @{d4 if dynamic else s4} {to}")
            if v6:
                rule(f"{agent} ip6 daddr @{d6 if dynamic else s6} {to}")
    return out


def chains_of(policy: FirewallPolicy) -> tuple[str, ...]:
    """Our chains in a table that holds ``policy``."""
    return (*CHAINS, PROXY_CHAIN) if policy.redirects else CHAINS


def _render_input(policy: FirewallPolicy, rule: Callable[[str, str], None]) -> None:
    """Ingress, policy drop: replies to the container's own connections and the explicit
    exceptions. Dropped, not rejected (the usual choice for inbound): an unsolicited
    packet learns nothing, not even that the address is up, and costs no answer."""
    rule("input", 'iif "lo" accept')
    # Neighbour discovery (and the router advertisement the output chain's solicitation
    # asks for) and the router's multicast listener queries: link-local, kernel-only.
    rule("input", f"ip6 hoplimit 255 icmpv6 type {_ND_IN} accept")
    rule("input", "ip6 hoplimit 1 ip6 saddr fe80::/10 icmpv6 type mld-listener-query accept")
    if policy.ipv6 == "fly":
        # Stateless like their output side (no IPv6 conntrack on Fly): `fly ssh console`
        # reaching the machine's sshd from 6PN, and the resolver's answers to the DNS user.
        rule("input", f"ip6 saddr {rendered(policy.fly_network)} tcp dport 22 accept")
        resolver = rendered(policy.fly_resolver)
        rule("input", f"ip6 saddr {resolver} meta l4proto {{ tcp, udp }} th sport 53 accept")
        # Packet Too Big, from whichever hop of the tunnel path sends it: without conntrack
        # it cannot be told related to the SSH flow, and dropping it (RFC 4890 4.3.1: must
        # not be) stalls large SSH output where a hop is narrower. It only lowers a path
        # MTU, never below 1280, and carries nothing to a socket.
        rule("input", "icmpv6 type packet-too-big accept")
    rule("input", "ct state invalid drop")
    # Replies (and their ICMP errors) to connections the container opened.
    rule("input", "ct direction reply ct state established,related accept")
    # The operator's published ports, from anywhere. Tracked flows only (`ct direction`
    # never matches an untracked packet): under `fly` no IPv6, where no answer could be
    # told from a new flow on the output side either.
    for proto in ("tcp", "udp"):
        if ports := policy.inbound_ports(proto):
            rule("input", f"ct direction original {proto} dport {_ports(ports)} accept")


def render_apply(
    policy: FirewallPolicy,
    existing: dict[str, Any] | None = None,
    *,
    replace_table: bool = False,
    carry: dict[str, list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]] | None = None,
    flush_dynamic: bool = False,
) -> str:
    """The ``nft -f`` transaction that installs ``policy``.

    ``existing`` is the parsed current table (:func:`parse_table`) so obsolete sets and
    chains are removed; ``replace_table`` deletes and recreates the table, re-adding the
    ``carry`` elements (set -> [(address, seconds left)]) to the dynamic sets.
    """
    lines = [f"add table {T}"]
    if replace_table:
        lines += [f"delete table {T}", f"add table {T}"]
    lines += [
        f"add chain {T} output {{ type filter hook output priority filter; policy drop; }}",
        f"flush chain {T} output",
        f"add chain {T} input {{ type filter hook input priority filter; policy drop; }}",
        f"flush chain {T} input",
        f"add chain {T} deny",
        f"flush chain {T} deny",
    ]
    if policy.redirects:
        # Before the filter (priority -100): the filter sees the redirected destination.
        lines += [f"add chain {T} {PROXY_CHAIN} {{ type nat hook output priority -100; policy accept; }}",
                  f"flush chain {T} {PROXY_CHAIN}"]
    defs = set_definitions(policy)
    for name, decl in defs.items():
        lines.append(f"add set {T} {name} {decl}")
    for name, values in static_contents(policy).items():
        lines += _fill(name, values)
    if flush_dynamic:
        lines += [f"flush set {T} {name}" for name in defs if name[0] == "d" and name[1] in "46"]
    for name, elems in (carry or {}).items():
        if name in defs and name[0] == "d" and elems:
            text = ", ".join(f"{rendered(a)} timeout {max(1, int(s))}s" for a, s in elems)
            lines.append(f"add element {T} {name} {{ {text} }}")
    lines += render_rules(policy)
    lines += render_redirect(policy)
    if existing and not replace_table:
        for name in sorted(set(existing["sets"]) - set(defs)):
            lines.append(f"delete set {T} {name}")
        for chain in sorted(set(existing["chains"]) - set(chains_of(policy))):
            lines.append(f"delete chain {T} {chain}")
    return "\n".join(lines) + "\n"


def render_update(policy: FirewallPolicy) -> str:
    """The refresh transaction: every static set flushed and refilled, nothing else."""
    lines: list[str] = []
    for g in policy.groups:
        s4, _d4, s6, _d6 = g.set_names()
        lines += _fill(s4, g.v4)
        lines += _fill(s6, g.v6)
    return "\n".join(lines) + "\n"


def render_additions(old: FirewallPolicy, new: FirewallPolicy) -> str | None:
    """The refresh transaction from ``old``'s static sets (what the kernel holds) to
    ``new``'s when they only gain elements: the additions alone, no flush (an interval
    set flushed of its elements costs the kernel an RCU grace period, ~10-20 ms). None
    when an element would go or the groups differ: :func:`render_update` then."""
    if [g.ports for g in old.groups] != [g.ports for g in new.groups]:
        return None
    lines: list[str] = []
    for before, after in zip(old.groups, new.groups, strict=True):
        s4, _d4, s6, _d6 = after.set_names()
        for name, had, has in ((s4, before.v4, after.v4), (s6, before.v6, after.v6)):
            kept: set[IPNetwork] = set(had)
            if not kept <= set(has):
                return None
            added = [n for n in has if n not in kept]
            if added:
                lines.append(f"add element {T} {name} {{ {_elements(added)} }}")
    return "\n".join(lines) + "\n" if lines else ""


# -- reading the kernel's view -------------------------------------------------------------


def _networks(value: Any) -> list[IPNetwork]:
    """Networks of one JSON set element (plain, prefix, range, or wrapped in ``elem``)."""
    if isinstance(value, dict) and "elem" in value:
        value = value["elem"].get("val")
    try:
        if isinstance(value, str):
            return [ipaddress.ip_network(value)]
        if isinstance(value, dict) and "prefix" in value:
            p = value["prefix"]
            return [ipaddress.ip_network(f"{p['addr']}/{p['len']}")]
        if isinstance(value, dict) and "range" in value:
            lo, hi = (ipaddress.ip_address(x) for x in value["range"])
            return list(ipaddress.summarize_address_range(lo, hi))
    except (ValueError, KeyError, TypeError):
        pass
    return []


def parse_table(text: str) -> dict[str, Any]:
    """``nft -j list table`` output -> {"sets": {name: set json}, "chains": [names]}."""
    sets: dict[str, Any] = {}
    chains: list[str] = []
    for item in json.loads(text).get("nftables", []):
        if "set" in item:
            sets[item["set"]["name"]] = item["set"]
        elif "chain" in item:
            chains.append(item["chain"]["name"])
    return {"sets": sets, "chains": chains}


def parse_denied(set_json: dict[str, Any], timeout: float) -> list[Denied]:
    out = []
    for elem in set_json.get("elem", []):
        body = elem.get("elem", {}) if isinstance(elem, dict) else {}
        concat = body.get("val", {}).get("concat") if isinstance(body.get("val"), dict) else None
        if not concat or len(concat) != 3:
            continue
        try:
            addr = str(ipaddress.ip_address(concat[0]))
            expires = float(body.get("expires", 0))
            out.append(
                Denied(
                    addr=addr,
                    proto=str(concat[1]),
                    port=int(concat[2]),
                    packets=int((body.get("counter") or {}).get("packets", 0)),
                    expires_in=expires,
                    seen_ago=max(0.0, timeout - expires),
                )
            )
        except (ValueError, TypeError):
            continue
    return out


class NftablesBackend(FirewallBackend):
    name = "nftables"
    #: the static sets hold exactly ``applied``'s: true from an apply to the next refresh
    #: (which may then only add), so every later refresh still rewrites them whole
    _sets_as_applied = False

    async def _nft(self, script: str, what: str) -> None:
        await self.runner.run(["nft", "-f", "-"], script, what=what)

    async def _table(self) -> dict[str, Any] | None:
        rc, out, err = await self.runner.run(["nft", "-j", "list", "table", T], check=False)
        if rc != 0:
            if "No such file" in err or "does not exist" in err:
                return None
            raise FirewallError(f"nft could not list table {T}: {err.strip()[:500]}")
        return parse_table(out)

    async def apply(self, policy: FirewallPolicy, *, fresh: bool = False) -> None:
        existing = await self._table()
        try:
            await self._nft(render_apply(policy, existing, flush_dynamic=fresh), "apply the firewall")
            mode = "update" if existing else "create"
        except FirewallError as first:
            if existing is None:
                raise
            # The table in the kernel cannot be updated in place (e.g. a set of ours with
            # another type): recreate it in one transaction, keeping DNS-filled addresses.
            carry = {} if fresh else self._carry(existing)
            log.warning("firewall_replace_table", reason=str(first)[:300])
            await self._nft(
                render_apply(policy, existing, replace_table=True, carry=carry),
                "replace the firewall table",
            )
            mode = "replace"
        self.applied = policy
        self._sets_as_applied = True
        log.info(
            "firewall_applied",
            backend=self.name,
            mode=mode,
            groups=len(policy.groups),
            v4=sum(len(g.v4) for g in policy.groups),
            v6=sum(len(g.v6) for g in policy.groups),
            ipv6=policy.ipv6,
            inbound=[str(p) for p in policy.inbound],
        )

    @staticmethod
    def _carry(
        existing: dict[str, Any],
    ) -> dict[str, list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]]:
        carry: dict[str, list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]] = {}
        for name, s in existing["sets"].items():
            if not name.startswith("d"):
                continue
            for elem in s.get("elem", []):
                left = elem.get("elem", {}).get("expires", 0) if isinstance(elem, dict) else 0
                for net in _networks(elem):
                    if net.num_addresses == 1 and int(left) >= 1:
                        carry.setdefault(name, []).append((net.network_address, int(left)))
        return carry

    async def _replace_static(self, policy: FirewallPolicy) -> None:
        first, self._sets_as_applied = self._sets_as_applied, False
        if first and self.applied is not None and await self._add_static(self.applied, policy):
            return
        await self._sets(render_update(policy), "refresh the allowed sets")
        log.debug("firewall_sets_replaced", backend=self.name, groups=len(policy.groups))

    async def _sets(self, script: str, what: str) -> None:
        """A script that only changes set elements: through ``set_scripts`` when given."""
        await (self.set_scripts or self._nft)(script, what)

    async def _add_static(self, old: FirewallPolicy, new: FirewallPolicy) -> bool:
        """The first refresh after an apply (the boot's first fill): only what ``new``
        adds to ``old``. False when it does not only add, or nft refused it (one
        transaction: nothing changed), and the sets are to be rewritten whole."""
        script = render_additions(old, new)
        if script is None:
            return False
        try:
            if script:
                await self._sets(script, "add to the allowed sets")
        except FirewallError as exc:
            log.debug("firewall_sets_add_failed", error=str(exc)[:300])
            return False
        log.debug("firewall_sets_replaced", backend=self.name, groups=len(new.groups),
                  added_only=True)
        return True

    async def read_denied(self) -> list[Denied]:
        timeout = float(self.applied.denied_timeout) if self.applied else 3600.0

        async def one(name: str) -> list[Denied]:
            rc, out, _err = await self.runner.run(["nft", "-j", "list", "set", T, name], check=False)
            if rc != 0:
                return []
            for item in json.loads(out).get("nftables", []):
                if "set" in item:
                    return parse_denied(item["set"], timeout)
            return []

        found = await asyncio.gather(one(DENIED_SETS[4]), one(DENIED_SETS[6]))
        return sorted(found[0] + found[1], key=lambda d: (-d.packets, d.seen_ago, d.addr, d.port))

    async def status(self) -> FirewallStatus:
        table = await self._table()
        if table is None:
            return FirewallStatus(self.name, False, detail=f"table {T} is not installed")
        counts = {name: len(s.get("elem", [])) for name, s in table["sets"].items()}
        return FirewallStatus(self.name, True, counts, detail=f"table {T}")

    async def contains(self, addr: str) -> list[str]:
        ip = parse_address(addr)
        table = await self._table()
        if table is None:
            return []
        hits = []
        for name, s in sorted(table["sets"].items()):
            if name in DENIED_SETS.values():
                continue
            nets = [n for e in s.get("elem", []) for n in _networks(e)]
            if member_of(ip, nets):
                hits.append(name)
        return hits

    async def teardown(self) -> None:
        await self._nft(f"add table {T}\ndelete table {T}\n", "remove the firewall table")
        self.applied = None
        log.info("firewall_removed", backend=self.name)
