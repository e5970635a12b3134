"""The firewall's policy as a plain value, and the validation in front of it.

Every address in a :class:`FirewallPolicy` has been through :mod:`ipaddress`
(construction fails otherwise), so nothing unvalidated can reach the rule text the
backends render (:mod:`.firewall_nft`, :mod:`.firewall_ipt`). :mod:`.firewall` re-exports
these names; the backends, probing and the self-test live there.

With the policy proxy on (issue 13) the policy carries the agent's uid and the proxy's
transparent port: the agent's TCP to ports 80/443 of allowed addresses is redirected
there, and never goes direct. :class:`DnsLimit` bounds the agent's queries to the local
DNS server (rate and name length), in the kernel: DNS as a channel out.
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from codetainer.network import model
from codetainer.network.model import IPAddress, IPNetwork

IPV6_POLICIES = ("deny", "fly", "allowlist")
INBOUND_PROTOCOLS = ("tcp", "udp")
INBOUND_FORM = "comma-separated tcp/PORT or udp/PORT (e.g. tcp/8080,udp/5353)"
#: a prefix broader than this is never accepted into a set (0.0.0.0/0 would be "allow all")
MIN_PREFIX = {4: 8, 6: 16}
_ADDR_CHARS = frozenset("0123456789abcdefABCDEF.:/")
FLY_NETWORK = ipaddress.IPv6Network("fdaa::/16")
FLY_RESOLVER = ipaddress.IPv6Address("fdaa::3")


class FirewallError(Exception):
    """A firewall operation failed; the message says what failed and what to do next."""


# -- validation ----------------------------------------------------------------------------


def parse_network(value: object) -> IPNetwork:
    """An address or CIDR as an ``ipaddress`` network, or ``ValueError`` saying why not."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        net: IPNetwork = value
    elif isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        net = ipaddress.ip_network(value)
    elif isinstance(value, str):
        if not value or len(value) > 49 or not set(value) <= _ADDR_CHARS:
            raise ValueError(f"{value[:60]!r} is not an IP address or CIDR")
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid IP address or CIDR: {exc}") from None
    else:
        raise ValueError(f"{value!r} ({type(value).__name__}) is not an IP address or CIDR")
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.scope_id is not None:
        raise ValueError(f"{net} has a scope id; scoped addresses cannot be allowlisted")
    if net.prefixlen < MIN_PREFIX[net.version]:
        raise ValueError(f"{net} is broader than /{MIN_PREFIX[net.version]}: refusing to allow it")
    return net


def parse_address(value: object) -> IPAddress:
    """A single address (not a network), validated like :func:`parse_network`."""
    net = parse_network(value)
    if net.num_addresses != 1:
        raise ValueError(f"{net} is a network; a single address is needed here")
    return net.network_address


def rendered(value: IPNetwork | IPAddress) -> str:
    """Text of a validated address for rule files; re-checked so no other byte can slip in."""
    text = str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network) and value.num_addresses == 1:
        text = str(value.network_address)
    if not set(text) <= _ADDR_CHARS:
        raise ValueError(f"refusing to render {text!r} into a firewall rule")
    return text


def check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{value!r} is not a TCP port (1-65535)")
    return value


@dataclass(frozen=True, order=True)
class InboundPort:
    """A port the operator published (Docker ``-p``): connections to it may come in."""

    proto: str
    port: int

    def __post_init__(self) -> None:
        if self.proto not in INBOUND_PROTOCOLS:
            raise ValueError(f"{self.proto!r} is not tcp or udp")
        check_port(self.port)

    def __str__(self) -> str:
        return f"{self.proto}/{self.port}"

    @classmethod
    def parse(cls, text: str) -> InboundPort:
        """``tcp/8080`` -> InboundPort("tcp", 8080); ``ValueError`` says what is wrong."""
        proto, sep, port = text.partition("/")
        if port in INBOUND_PROTOCOLS and proto.isdigit():
            raise ValueError(f"{text[:20]!r}: the protocol comes first ({port}/{proto})")
        # ASCII digits, no sign, no leading zero (str.isdigit would take "²").
        digits = 0 < len(port) <= 5 and set(port) <= set(string.digits) and port[0] != "0"
        if not sep or proto not in INBOUND_PROTOCOLS or not digits:
            raise ValueError(f"{text[:20]!r} is not tcp/PORT or udp/PORT")
        if int(port) > 65535:
            raise ValueError(f"{text[:20]!r}: port {port} is not in 1-65535")
        return cls(proto, int(port))


def parse_inbound(text: str) -> tuple[InboundPort, ...]:
    """``"tcp/8080, udp/5353"`` -> sorted, deduplicated ports; empty text: none."""
    if not text.strip():
        return ()
    return tuple(sorted({InboundPort.parse(item.strip()) for item in text.split(",")}))


# -- the policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PortGroup:
    """Destinations allowed on one set of TCP ports; ``v4``/``v6`` fill the *static* sets."""

    ports: tuple[int, ...]
    v4: tuple[ipaddress.IPv4Network, ...] = ()
    v6: tuple[ipaddress.IPv6Network, ...] = ()

    def __post_init__(self) -> None:
        ports = tuple(sorted({check_port(p) for p in self.ports}))
        if not ports:
            raise ValueError("a port group needs at least one port")
        v4 = [parse_network(n) for n in self.v4]
        v6 = [parse_network(n) for n in self.v6]
        if any(n.version != 4 for n in v4) or any(n.version != 6 for n in v6):
            raise ValueError("PortGroup: v4 holds IPv4 networks and v6 holds IPv6 networks only")
        object.__setattr__(self, "ports", ports)
        # Collapsed: interval sets refuse overlapping elements, and it dedupes for free.
        object.__setattr__(self, "v4", tuple(ipaddress.collapse_addresses(v4)))
        object.__setattr__(self, "v6", tuple(ipaddress.collapse_addresses(v6)))

    @classmethod
    def of(cls, ports: Iterable[int], addresses: Iterable[object]) -> PortGroup:
        """Group from ports and addresses/CIDRs of both families (strings or ipaddress objects)."""
        nets = [parse_network(a) for a in addresses]
        return cls(
            tuple(ports),
            tuple(n for n in nets if isinstance(n, ipaddress.IPv4Network)),
            tuple(n for n in nets if isinstance(n, ipaddress.IPv6Network)),
        )

    @property
    def key(self) -> str:
        return model.port_key(self.ports)

    def set_names(self) -> tuple[str, str, str, str]:
        """(s4, d4, s6, d6) set names of this group."""
        p = self.ports
        return (
            model.static_set(4, p),
            model.dynamic_set(4, p),
            model.static_set(6, p),
            model.dynamic_set(6, p),
        )


#: the agent's TCP ports that go through the policy proxy when it is on; every other port
#: an entry names stays direct (that is how non-HTTP traffic stays possible per entry)
PROXIED_PORTS: tuple[int, ...] = (80, 443)
#: longest query name (characters, no final dot) the agent may send to the local DNS
#: server. The longest names the shipped allowlist's work asks for are about 40
#: (``private-user-images.githubusercontent.com``), an IPv6 reverse name is 72; the
#: issue's exfiltration used 228. An allowlisted name longer than this raises the bound
#: for that policy (:func:`dns_name_bound`). claude-docker's bound is 192 bytes a query.
DNS_NAME_BOUND = 100
#: bytes of a query besides the name's characters: header 12, the name's first length
#: octet and root label 2, QTYPE and QCLASS 4, and the most a stub adds: an EDNS OPT
#: record (11) with a client cookie option (12; dig, c-ares 1.34). A bare query (glibc,
#: musl, Go) may so carry a name 23 characters longer than the bound.
DNS_QUERY_OVERHEAD = 12 + 2 + 4 + 11 + 12
#: most octets of an IP and a TCP header (options included)
_IP_HEADER = {4: 20, 6: 40}
_TCP_HEADER = 60


def dns_name_bound(names: Iterable[str], floor: int = DNS_NAME_BOUND) -> int:
    """The name bound for an allowlist: ``floor``, or its longest exact name if longer."""
    return max([floor, *(len(n.rstrip(".")) for n in names)])


def parse_dns_rate(text: str) -> tuple[int, int] | None:
    """``"RATE/BURST"`` (queries a second / burst in packets) -> (rate, burst); ``off``: None."""
    value = text.strip().lower()
    if value in ("off", "0", "none"):
        return None
    rate, sep, burst = value.partition("/")
    if not sep or not rate.isascii() or not burst.isascii() or not rate.isdigit() or not burst.isdigit():
        raise ValueError(f"{text[:40]!r} is not RATE/BURST (e.g. 50/5000) or off")
    out = (int(rate), int(burst))
    if not (1 <= out[0] <= 10_000 and 1 <= out[1] <= 10_000):
        raise ValueError(f"{text[:40]!r}: RATE and BURST must be 1-10000 (the iptables limit match's range)")
    return out


@dataclass(frozen=True)
class DnsLimit:
    """The agent's queries to the local DNS server, bounded in the kernel: past a burst of
    ``burst`` packets (UDP and TCP share it), those over ``rate`` a second are dropped,
    and so is any UDP query too long for a name of ``max_name`` characters (a TCP segment
    too long for two of them: glibc writes the A and AAAA queries in one)."""

    #: the local DNS server's address (``CODETAINER_DNS_LISTEN``)
    server: IPAddress
    rate: int
    burst: int
    max_name: int = DNS_NAME_BOUND
    port: int = 53
    #: other uids under the same budget: the policy proxy's, which resolves the names the
    #: agent asks it to reach (else ``CONNECT <label>.allowlisted.example`` by the
    #: thousand would carry the channel the limit closes)
    also_uids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "server", parse_address(self.server))
        check_port(self.port)
        for uid in self.also_uids:
            if isinstance(uid, bool) or not isinstance(uid, int) or not 0 < uid < 2**32:
                raise ValueError(f"DnsLimit also_uids: {uid!r} is not a non-root uid")
        for name, top in (("rate", 10_000), ("burst", 10_000), ("max_name", 253)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"DnsLimit {name}={value!r}: an integer 1-{top} is needed")

    def max_length(self, proto: str) -> int:
        """Longest packet a query may take, IP header included (nft ``meta length``,
        iptables ``-m length``): for TCP the largest header and two queries with their
        length prefixes in one segment (glibc writes the A and AAAA queries together)."""
        query = self.max_name + DNS_QUERY_OVERHEAD
        if proto == "udp":
            return _IP_HEADER[self.server.version] + 8 + query
        return _IP_HEADER[self.server.version] + _TCP_HEADER + 2 * (2 + query)


def _uid(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} {value!r} is not an integer uid")
    if not 0 <= value < 2**32 - 1:
        raise ValueError(f"{name} {value} is out of range")
    return value


@dataclass(frozen=True)
class FirewallPolicy:
    """Everything the firewall needs; build with :meth:`build` from strings."""

    groups: tuple[PortGroup, ...]
    #: uid of the DNS server: the only user that may reach the upstream resolvers
    dns_uid: int
    upstreams: tuple[IPAddress, ...] = ()
    ipv6: str = "deny"
    #: record denied destinations (with counters) in the kernel
    log_denied: bool = True
    #: default timeout of the dynamic (DNS-filled) sets, seconds; >= the DNS cache's max TTL
    dynamic_timeout: int = 3600
    #: how long a denied destination stays listed after its last packet, seconds
    denied_timeout: int = 3600
    denied_size: int = 4096
    fly_network: ipaddress.IPv6Network = FLY_NETWORK
    fly_resolver: ipaddress.IPv6Address = FLY_RESOLVER
    #: published ports that accept inbound connections; nothing else comes in (values or
    #: ``tcp/8080`` strings)
    inbound: tuple[InboundPort, ...] = ()
    #: the daemon's DNS forwarding hook (address, port), which only the DNS server's uid
    #: may send to (it answers allowlisted names and fills the dynamic sets); None: no hook
    dns_hook: tuple[IPAddress, int] | None = None
    #: the agent's uid, for the rules below; None: the agent is treated like any other uid
    agent_uid: int | None = None
    #: the policy proxy's transparent port on loopback: the agent's TCP to ports 80/443
    #: (:data:`PROXIED_PORTS`) of allowed addresses is redirected there, and any other of
    #: its TCP to those ports is denied (never direct); None: no proxy
    proxy_port: int | None = None
    #: the agent's queries to the local DNS server, bounded; None: unbounded
    dns_limit: DnsLimit | None = None

    def __post_init__(self) -> None:
        if any(not isinstance(g, PortGroup) for g in self.groups):
            raise ValueError("groups must be PortGroup values")
        keys = [g.key for g in self.groups]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate port groups: {sorted(keys)}; merge them first")
        _uid("dns_uid", self.dns_uid)
        if self.ipv6 not in IPV6_POLICIES:
            raise ValueError(f"ipv6 policy {self.ipv6!r}: use one of {', '.join(IPV6_POLICIES)}")
        for name in ("dynamic_timeout", "denied_timeout", "denied_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: a positive integer is needed")
        object.__setattr__(self, "upstreams", tuple(parse_address(u) for u in self.upstreams))
        fly_net = parse_network(self.fly_network)
        fly_res = parse_address(self.fly_resolver)
        if fly_net.version != 6 or fly_res.version != 6:
            raise ValueError("fly_network and fly_resolver must be IPv6")
        object.__setattr__(self, "fly_network", fly_net)
        object.__setattr__(self, "fly_resolver", fly_res)
        ports = [p if isinstance(p, InboundPort) else InboundPort.parse(str(p)) for p in self.inbound]
        object.__setattr__(self, "inbound", tuple(sorted(set(ports))))
        if self.dns_hook is not None:
            addr, port = self.dns_hook
            object.__setattr__(self, "dns_hook", (parse_address(addr), check_port(port)))
        if self.agent_uid is not None:
            _uid("agent_uid", self.agent_uid)
            if self.agent_uid in (0, self.dns_uid):
                raise ValueError(f"agent_uid {self.agent_uid} is root's or the DNS server's: "
                                 "the rules tell the agent apart by uid")
        elif self.proxy_port is not None or self.dns_limit is not None:
            raise ValueError("proxy_port and dns_limit need agent_uid: they are rules for the agent")
        if self.proxy_port is not None:
            check_port(self.proxy_port)
            if self.proxy_port in PROXIED_PORTS:
                raise ValueError(f"proxy_port {self.proxy_port} is a port it redirects")
        if self.dns_limit is not None and not isinstance(self.dns_limit, DnsLimit):
            raise ValueError("dns_limit must be a DnsLimit value")

    @classmethod
    def build(
        cls,
        groups: Mapping[tuple[int, ...], Iterable[object]],
        *,
        dns_uid: int,
        upstreams: Iterable[object] = (),
        **options: Any,
    ) -> FirewallPolicy:
        """Policy from ``{ports: [address or CIDR, ...]}``; groups with equal ports merge."""
        merged: dict[str, tuple[tuple[int, ...], list[object]]] = {}
        for ports, addrs in groups.items():
            entry = merged.setdefault(model.port_key(ports), (ports, []))
            entry[1].extend(addrs)
        return cls(
            tuple(PortGroup.of(p, a) for p, a in merged.values()),
            dns_uid=dns_uid,
            upstreams=tuple(parse_address(u) for u in upstreams),
            **options,
        )

    def upstreams_of(self, version: int) -> tuple[IPAddress, ...]:
        return tuple(u for u in self.upstreams if u.version == version)

    def inbound_ports(self, proto: str) -> tuple[int, ...]:
        return tuple(p.port for p in self.inbound if p.proto == proto)

    @property
    def redirects(self) -> bool:
        """The agent's HTTP(S) goes to the policy proxy."""
        return self.agent_uid is not None and self.proxy_port is not None

    def proxied(self, group: PortGroup) -> tuple[int, ...]:
        """The ports of ``group`` whose agent connections are redirected to the proxy."""
        return tuple(p for p in group.ports if p in PROXIED_PORTS) if self.redirects else ()

    def shape(self) -> FirewallPolicy:
        """The policy without static addresses: equal shapes mean a set refresh suffices."""
        return replace(self, groups=tuple(PortGroup(g.ports) for g in self.groups))

