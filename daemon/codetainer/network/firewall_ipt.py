"""iptables fallback backend, for kernels without nf_tables.

Our rules live in our own chains ``CODETAINER-OUT`` (jumped to from ``OUTPUT``),
``CODETAINER-IN`` (jumped to from ``INPUT``, ends in DROP) and ``CODETAINER-DENY``,
written with ``iptables-restore --noflush``: one commit per family replaces all three
chains at once; nothing else in the table is touched (the jumps are the only rules we
add to a built-in chain, and its policy stays as it was). Addresses live in
ipsets named ``ct-<set>`` (:func:`codetainer.network.model.ipset_name`); a static set is
refreshed by filling a temporary set and ``ipset swap``-ing it in, which is atomic per
set. ``iptables-legacy`` is preferred when installed (a kernel without nf_tables cannot
run the nft-based ``iptables``).

With the policy proxy on, ``CODETAINER-NAT`` (nat table, jumped to from its ``OUTPUT``)
redirects the agent's TCP 80/443 to allowed addresses to the proxy's transparent port;
the nat table is a second table in the same ``iptables-restore`` input (committed first:
a redirect is in place before the filter's deny of the rest). The agent's DNS queries
go through ``CODETAINER-DNS`` (size bound, rate limit) when the policy limits them.

Denied destinations go into ``ct-denied4/6`` (``hash:ip,port`` with counters): the rule
order "count if present, then add if absent" keeps counts exact; the element's timeout
is not refreshed by later packets, so ``seen_ago`` is the *first* time seen here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
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

CHAIN = "CODETAINER-OUT"
IN_CHAIN = "CODETAINER-IN"
DENY = "CODETAINER-DENY"
#: the agent's queries to the local DNS server (filter table; only with a DNS limit)
DNS_CHAIN = "CODETAINER-DNS"
#: the policy proxy's redirect (nat table; only with the proxy)
NAT_CHAIN = "CODETAINER-NAT"
#: built-in chain -> our chain it jumps to (first rule)
JUMPS = {"OUTPUT": CHAIN, "INPUT": IN_CHAIN}
#: the same in the nat table
NAT_JUMPS = {"OUTPUT": NAT_CHAIN}
PREFIX = "ct-"
_MULTIPORT_MAX = 15


def iptables_tools() -> tuple[str, str, str, str]:
    """(iptables, iptables-restore, ip6tables, ip6tables-restore), legacy when installed."""
    if shutil.which("iptables-legacy-restore") and shutil.which("ip6tables-legacy-restore"):
        return ("iptables-legacy", "iptables-legacy-restore",
                "ip6tables-legacy", "ip6tables-legacy-restore")
    return ("iptables", "iptables-restore", "ip6tables", "ip6tables-restore")


def _fam(version: int) -> str:
    return "inet" if version == 4 else "inet6"


def ipset_definitions(policy: FirewallPolicy) -> dict[str, tuple[str, str]]:
    """ipset name -> (model set name, ``create`` arguments)."""
    out: dict[str, tuple[str, str]] = {}

    def add(name: str, spec: str) -> None:
        ipset = model.ipset_name(name)
        if ipset in out:
            raise FirewallError(
                f"ipset name {ipset} is used twice (port lists too long for 31 characters): "
                "shorten the port lists in the allowlist"
            )
        out[ipset] = (name, spec)

    for v in (4, 6):
        add(f"upstream{v}", f"hash:ip family {_fam(v)}")
    for g in policy.groups:
        s4, d4, s6, d6 = g.set_names()
        add(s4, "hash:net family inet")
        add(s6, "hash:net family inet6")
        add(d4, f"hash:ip family inet timeout {policy.dynamic_timeout}")
        add(d6, f"hash:ip family inet6 timeout {policy.dynamic_timeout}")
    for v in (4, 6):
        add(f"denied{v}", f"hash:ip,port family {_fam(v)} timeout {policy.denied_timeout} "
            f"counters maxelem {policy.denied_size}")
    return out


def _swap_in(ipset: str, spec: str, values: Iterable[Any]) -> list[str]:
    tmp = ipset[:29] + "-n"
    lines = [f"create {tmp} {spec} -exist", f"flush {tmp}"]
    lines += [f"add {tmp} {rendered(v)} -exist" for v in values]
    lines += [f"swap {tmp} {ipset}", f"destroy {tmp}"]
    return lines


def render_ipsets(policy: FirewallPolicy, *, static_only: bool = False) -> str:
    """``ipset restore`` script: create every set, then swap in the static contents."""
    defs = ipset_definitions(policy)
    lines = [] if static_only else [f"create {s} {spec} -exist" for s, (_n, spec) in defs.items()]
    contents: dict[str, tuple[Any, ...]] = {}
    if not static_only:
        contents["upstream4"] = policy.upstreams_of(4)
        contents["upstream6"] = policy.upstreams_of(6)
    for g in policy.groups:
        s4, _d4, s6, _d6 = g.set_names()
        contents[s4] = g.v4
        contents[s6] = g.v6
    for name, values in contents.items():
        ipset = model.ipset_name(name)
        lines += _swap_in(ipset, defs[ipset][1], values)
    return "\n".join(lines) + "\n"


def _multiport(ports: tuple[int, ...], side: str = "d") -> list[str]:
    """``--dport``/``-m multiport --dports`` matches (``side="s"``: source ports), chunked."""
    chunks = [ports[i : i + _MULTIPORT_MAX] for i in range(0, len(ports), _MULTIPORT_MAX)]
    return [
        f"--{side}port {c[0]}" if len(c) == 1 else f"-m multiport --{side}ports " + ",".join(map(str, c))
        for c in chunks
    ]


def render_rules(policy: FirewallPolicy, version: int, *, add_jumps: Iterable[str] = ()) -> str:
    """``iptables-restore --noflush`` input for one family; ``add_jumps``: the built-in
    chains (keys of :data:`JUMPS`) that do not jump to ours yet."""
    uid = policy.dns_uid
    v = version
    out = ["*filter", f":{CHAIN} - [0:0]", f":{IN_CHAIN} - [0:0]", f":{DENY} - [0:0]"]
    limit = dns_limit_of(policy, v)
    if limit is not None:
        out.append(f":{DNS_CHAIN} - [0:0]")
    out += [f"-I {hook} 1 -j {JUMPS[hook]}" for hook in JUMPS if hook in set(add_jumps)]

    def rule(text: str, chain: str = CHAIN) -> None:
        out.append(f"-A {chain} {text}")

    if policy.dns_hook is not None and policy.dns_hook[0].version == v:
        # The DNS server's alone, before the loopback accept (see firewall_nft).
        addr, port = policy.dns_hook
        for proto in ("udp", "tcp"):
            rule(f"-d {rendered(addr)} -p {proto} --dport {port} "
                 f"-m owner ! --uid-owner {uid} -j {DENY}")
    if limit is not None:
        _render_dns_limit(limit, policy.agent_uid, rule)
    rule("-o lo -j ACCEPT")
    if policy.redirects:
        # A redirected connection keeps its first route's device (see firewall_nft).
        loopback = "127.0.0.1" if v == 4 else "::1"
        rule(f"-d {loopback} -p tcp --dport {policy.proxy_port} -m conntrack --ctstate DNAT -j ACCEPT")
    fly = v == 6 and policy.ipv6 == "fly"
    if v == 6:
        for t in ("neighbour-solicitation", "neighbour-advertisement", "router-solicitation"):
            rule(f"-p ipv6-icmp --icmpv6-type {t} -m hl --hl-eq 255 -j ACCEPT")
        for t in ("130", "131", "132", "143"):  # multicast listener reports (MLD v1/v2)
            rule(f"-d ff02::/16 -p ipv6-icmp --icmpv6-type {t} -m hl --hl-eq 1 -j ACCEPT")
    if fly:
        # Stateless: Fly's kernel has no IPv6 conntrack, so no conntrack match in this family.
        # SSH over 6PN only; 2605:4c40::/32 carries no SSH (see firewall_nft).
        rule(f"-d {rendered(policy.fly_network)} -p tcp --sport 22 -j ACCEPT")
        for proto in ("udp", "tcp"):
            rule(f"-d {rendered(policy.fly_resolver)} -p {proto} --dport 53 "
                 f"-m owner --uid-owner {uid} -j ACCEPT")
    if not fly:
        # Answers on the published ports, in connections opened from outside only (see
        # firewall_nft); none in Fly's IPv6, which has no conntrack to tell direction.
        for proto in ("tcp", "udp"):
            for ports in _multiport(policy.inbound_ports(proto), "s"):
                rule(f"-p {proto} {ports} -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT")
    if policy.redirects:
        # The agent's HTTP(S) that CODETAINER-NAT did not send to the proxy never goes
        # direct (see firewall_nft).
        for ports in _multiport(PROXIED_PORTS):
            rule(f"-p tcp {ports} -m owner --uid-owner {policy.agent_uid} -j {DENY}")
    # Before the conntrack shortcut (see firewall_nft): UDP off loopback is the DNS
    # server's alone, whatever conntrack remembers of an earlier flow on the same ports.
    rule(f"-p udp -m owner ! --uid-owner {uid} -j {DENY}")
    if not fly:
        # The container's own connections only (original direction; see firewall_nft).
        rule("-m conntrack --ctstate ESTABLISHED,RELATED --ctdir ORIGINAL -j ACCEPT")
        rule("-m conntrack --ctstate INVALID -j DROP")
    if v == 4 or policy.upstreams_of(6):  # an IPv6 upstream: in any policy (see firewall_nft)
        up = model.ipset_name(f"upstream{v}")
        for proto in ("udp", "tcp"):
            rule(f"-p {proto} --dport 53 -m owner --uid-owner {uid} "
                 f"-m set --match-set {up} dst -j ACCEPT")
    rule(f"-p tcp --dport 22 -j {DENY}")
    if v == 4 or policy.ipv6 == "allowlist":
        # Static sets, then the internal screen, then the DNS-filled sets (see firewall_nft).
        for dynamic in (False, True):
            if dynamic:
                for net in model.INTERNAL[v]:
                    rule(f"-d {net} -j {DENY}")
            for g in policy.groups:
                s4, d4, s6, d6 = g.set_names()
                name = (d4 if dynamic else s4) if v == 4 else (d6 if dynamic else s6)
                for ports in _multiport(g.ports):
                    rule(f"-p tcp {ports} -m set --match-set {model.ipset_name(name)} dst -j ACCEPT")
    rule(f"-j {DENY}")
    _render_input(policy, v, rule)
    if policy.log_denied:
        denied = model.ipset_name(f"denied{v}")
        for proto in ("tcp", "udp"):
            # Count first (no-op for a new destination), then add: "add --exist" would
            # reset the counters.
            rule(f"-p {proto} -m set --match-set {denied} dst,dst", DENY)
            rule(f"-p {proto} -j SET --add-set {denied} dst,dst", DENY)
    rule("-p tcp -j REJECT --reject-with tcp-reset", DENY)
    icmp = "icmp-admin-prohibited" if v == 4 else "adm-prohibited"
    rule(f"-j REJECT --reject-with {icmp}", DENY)
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def dns_limit_of(policy: FirewallPolicy, version: int) -> DnsLimit | None:
    """The policy's DNS limit if its server is in this family."""
    limit = policy.dns_limit
    return limit if limit is not None and limit.server.version == version else None


def _render_dns_limit(limit: DnsLimit, uid: int | None, rule: Callable[..., None]) -> None:
    """Jumps to ``CODETAINER-DNS`` for the agent's queries (before the loopback accept)
    and the chain: over-long queries dropped, then one budget for UDP and TCP (a chain
    of its own so both share one ``limit`` match), what passes returns to the loopback
    accept (see firewall_nft)."""
    server = rendered(limit.server)
    for who in (uid, *limit.also_uids):
        for proto in ("udp", "tcp"):
            rule(f"-d {server} -p {proto} --dport {limit.port} -m owner --uid-owner {who} "
                 f"-j {DNS_CHAIN}")
    for proto in ("udp", "tcp"):
        rule(f"-p {proto} -m length --length {limit.max_length(proto) + 1}:65535 -j DROP", DNS_CHAIN)
    rule(f"-m limit --limit {limit.rate}/second --limit-burst {limit.burst} -j RETURN", DNS_CHAIN)
    rule("-j DROP", DNS_CHAIN)


def nat_wanted(policy: FirewallPolicy, version: int) -> bool:
    """Whether this family gets the redirect: IPv6 only where the agent may use it."""
    return policy.redirects and (version == 4 or policy.ipv6 == "allowlist")


def render_nat(policy: FirewallPolicy, version: int, *, add_jump: bool = False) -> str:
    """``iptables-restore --noflush`` input for the nat table (empty without the proxy):
    the agent's TCP to the proxied ports of allowed addresses goes to the transparent
    port. Static sets, the internal screen (no redirect: the filter denies and records
    it), the DNS-filled sets, as in the filter."""
    if not nat_wanted(policy, version):
        return ""
    v = version
    out = ["*nat", f":{NAT_CHAIN} - [0:0]"]
    if add_jump:
        out.append(f"-I OUTPUT 1 -j {NAT_CHAIN}")
    to = f"-j REDIRECT --to-ports {policy.proxy_port}"
    for dynamic in (False, True):
        if dynamic:
            out += [f"-A {NAT_CHAIN} -d {net} -j RETURN" for net in model.INTERNAL[v]]
        for g in policy.groups:
            s4, d4, s6, d6 = g.set_names()
            name = (d4 if dynamic else s4) if v == 4 else (d6 if dynamic else s6)
            for ports in _multiport(policy.proxied(g)):
                out.append(f"-A {NAT_CHAIN} -p tcp {ports} -m owner --uid-owner {policy.agent_uid} "
                           f"-m set --match-set {model.ipset_name(name)} dst {to}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def _render_input(policy: FirewallPolicy, v: int, rule: Callable[[str, str], None]) -> None:
    """``CODETAINER-IN``: the nftables input chain's rules (see firewall_nft), ending in
    DROP since the built-in INPUT chain and its policy are not ours."""
    fly = v == 6 and policy.ipv6 == "fly"
    rule("-i lo -j ACCEPT", IN_CHAIN)
    if v == 6:
        for t in ("neighbour-solicitation", "neighbour-advertisement", "router-advertisement"):
            rule(f"-p ipv6-icmp --icmpv6-type {t} -m hl --hl-eq 255 -j ACCEPT", IN_CHAIN)
        rule("-s fe80::/10 -p ipv6-icmp --icmpv6-type 130 -m hl --hl-eq 1 -j ACCEPT", IN_CHAIN)
    if fly:
        # Stateless, no conntrack match in this family (see the output side).
        rule(f"-s {rendered(policy.fly_network)} -p tcp --dport 22 -j ACCEPT", IN_CHAIN)
        for proto in ("udp", "tcp"):
            rule(f"-s {rendered(policy.fly_resolver)} -p {proto} --sport 53 -j ACCEPT", IN_CHAIN)
        rule("-p ipv6-icmp --icmpv6-type packet-too-big -j ACCEPT", IN_CHAIN)  # see firewall_nft
    else:
        rule("-m conntrack --ctstate INVALID -j DROP", IN_CHAIN)
        rule("-m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT", IN_CHAIN)
        for proto in ("tcp", "udp"):
            for ports in _multiport(policy.inbound_ports(proto)):
                rule(f"-p {proto} {ports} -m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL "
                     "-j ACCEPT", IN_CHAIN)
    rule("-j DROP", IN_CHAIN)


def parse_ipset_save(text: str) -> dict[str, list[str]]:
    """``ipset save`` -> {ipset name: [element text, ...]} for sets named ``ct-*``."""
    sets: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith(PREFIX) and not parts[1].endswith("-n"):
            if parts[0] == "create":
                sets.setdefault(parts[1], [])
            elif parts[0] == "add" and len(parts) >= 3:
                sets.setdefault(parts[1], []).append(parts[2])
    return sets


def parse_denied_list(text: str, timeout: float) -> list[Denied]:
    """``ipset list ct-deniedN`` members: ``ADDR,tcp:443 timeout N packets P bytes B``."""
    out: list[Denied] = []
    members = False
    for line in text.splitlines():
        if line.startswith("Members:"):
            members = True
            continue
        parts = line.split()
        if not members or not parts or "," not in parts[0]:
            continue
        addr, _, service = parts[0].rpartition(",")
        proto, _, port = service.partition(":")
        opts = dict(zip(parts[1::2], parts[2::2], strict=False))
        try:
            expires = float(opts.get("timeout", 0))
            out.append(
                Denied(
                    addr=str(ipaddress.ip_address(addr)),
                    proto=proto,
                    port=int(port),
                    packets=int(opts.get("packets", 0)),
                    expires_in=expires,
                    seen_ago=max(0.0, timeout - expires),
                    first_seen=True,
                )
            )
        except ValueError:
            continue
    return out


class IptablesBackend(FirewallBackend):
    name = "iptables"

    def _tools(self, version: int) -> tuple[str, str]:
        t = iptables_tools()
        return (t[0], t[1]) if version == 4 else (t[2], t[3])

    async def _ipset(self, script: str, what: str) -> None:
        await self.runner.run(["ipset", "restore"], script, what=what)

    async def _has_jump(self, version: int, hook: str = "OUTPUT", *, nat: bool = False) -> bool:
        ipt, _ = self._tools(version)
        table = ["-t", "nat"] if nat else []
        chain = (NAT_JUMPS if nat else JUMPS)[hook]
        rc, _o, _e = await self.runner.run([ipt, "-w", *table, "-C", hook, "-j", chain], check=False)
        return rc == 0

    async def _remove_nat(self, version: int) -> None:
        """The redirect's jump and chain, if there (best effort: no nat table, nothing to do)."""
        ipt, _ = self._tools(version)
        while await self._has_jump(version, nat=True):
            await self.runner.run([ipt, "-w", "-t", "nat", "-D", "OUTPUT", "-j", NAT_CHAIN],
                                  what="unhook the redirect")
        for flag in ("-F", "-X"):
            await self.runner.run([ipt, "-w", "-t", "nat", flag, NAT_CHAIN], check=False)

    async def apply(self, policy: FirewallPolicy, *, fresh: bool = False) -> None:
        defs = ipset_definitions(policy)
        script = render_ipsets(policy)
        if fresh:  # before the rules change: a boot starts the DNS-filled sets empty
            script += "".join(f"flush {ipset}\n" for ipset, (name, _spec) in defs.items()
                              if name[0] == "d" and name[1] in "46")
        await self._ipset(script, "create and fill the ipsets")
        before = self.applied
        for v in (4, 6):
            ipt, restore = self._tools(v)
            missing = [hook for hook in JUMPS if not await self._has_jump(v, hook)]
            jump = nat_wanted(policy, v) and not await self._has_jump(v, nat=True)
            # One input, the nat table first: the redirect is in place before the deny.
            rules = render_nat(policy, v, add_jump=jump) + render_rules(policy, v, add_jumps=missing)
            await self.runner.run([restore, "-w", "--noflush"], rules, what=f"apply IPv{v} rules")
            # What the new rules no longer use: this daemon's, an earlier one's at boot, and
            # with the proxy on always (the nat table is in use then anyway).
            old = before if before is not None and not fresh else None
            stale = fresh or policy.redirects or (old is not None and nat_wanted(old, v))
            if not nat_wanted(policy, v) and stale:
                await self._remove_nat(v)
            if dns_limit_of(policy, v) is None and (fresh or (old is not None and dns_limit_of(old, v))):
                for flag in ("-F", "-X"):
                    await self.runner.run([ipt, "-w", flag, DNS_CHAIN], check=False)
        # Sets the new rules no longer reference: best effort, a leftover set is harmless.
        for name in set(await self._ours()) - set(defs):
            await self.runner.run(["ipset", "destroy", name], check=False)
        self.applied = policy
        log.info(
            "firewall_applied",
            backend=self.name,
            groups=len(policy.groups),
            v4=sum(len(g.v4) for g in policy.groups),
            v6=sum(len(g.v6) for g in policy.groups),
            ipv6=policy.ipv6,
            inbound=[str(p) for p in policy.inbound],
        )

    async def _ours(self) -> dict[str, list[str]]:
        rc, out, err = await self.runner.run(["ipset", "save"], check=False)
        if rc != 0:
            raise FirewallError(f"ipset save failed: {err.strip()[:500]}; is ipset installed?")
        return parse_ipset_save(out)

    async def _replace_static(self, policy: FirewallPolicy) -> None:
        await self._ipset(render_ipsets(policy, static_only=True), "refresh the allowed sets")
        log.debug("firewall_sets_replaced", backend=self.name, groups=len(policy.groups))

    async def read_denied(self) -> list[Denied]:
        timeout = float(self.applied.denied_timeout) if self.applied else 3600.0

        async def one(v: int) -> list[Denied]:
            name = model.ipset_name(f"denied{v}")
            rc, out, _e = await self.runner.run(["ipset", "list", name], check=False)
            return parse_denied_list(out, timeout) if rc == 0 else []

        a, b = await asyncio.gather(one(4), one(6))
        return sorted(a + b, key=lambda d: (-d.packets, d.seen_ago, d.addr, d.port))

    async def status(self) -> FirewallStatus:
        ipt, _ = self._tools(4)
        rc, _o, _e = await self.runner.run([ipt, "-w", "-S", CHAIN], check=False)
        sets = await self._ours()
        counts = {k.removeprefix(PREFIX): len(v) for k, v in sets.items()}
        active = rc == 0 and await self._has_jump(4) and await self._has_jump(4, "INPUT")
        return FirewallStatus(self.name, active, counts, detail=f"{ipt}: chains {CHAIN}, {IN_CHAIN}, {DENY}")

    async def contains(self, addr: str) -> list[str]:
        ip = parse_address(addr)
        hits = []
        for name, elems in sorted((await self._ours()).items()):
            if "denied" in name:
                continue
            nets: list[IPNetwork] = []
            for e in elems:
                try:
                    nets.append(ipaddress.ip_network(e))
                except ValueError:
                    continue
            if member_of(ip, nets):
                hits.append(name.removeprefix(PREFIX))
        return hits

    async def teardown(self) -> None:
        for v in (4, 6):
            ipt, _ = self._tools(v)
            for hook, chain in JUMPS.items():
                while await self._has_jump(v, hook):
                    await self.runner.run([ipt, "-w", "-D", hook, "-j", chain], what="unhook")
            for chain in (CHAIN, IN_CHAIN, DENY, DNS_CHAIN):
                await self.runner.run([ipt, "-w", "-F", chain], check=False)
            for chain in (CHAIN, IN_CHAIN, DENY, DNS_CHAIN):
                await self.runner.run([ipt, "-w", "-X", chain], check=False)
            await self._remove_nat(v)
        for name in await self._ours():
            await self.runner.run(["ipset", "destroy", name], check=False)
        self.applied = None
        log.info("firewall_removed", backend=self.name)
