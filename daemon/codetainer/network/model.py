"""Names shared by the allowlist, the DNS config generators and the firewall.

The firewall lives in nftables table ``inet codetainer`` (iptables fallback: chains
prefixed ``CODETAINER`` and ipsets prefixed ``ct-``). Allowed destinations are grouped
by their port set; each group has two kernel sets per family:

* ``s4_<key>`` / ``s6_<key>``: the *static* set, replaced atomically by the refresh task
  (flush + add in one transaction);
* ``d4_<key>`` / ``d6_<key>``: the *dynamic* set, filled by the DNS server itself
  (dnsmasq ``nftset=``/``ipset=``) before it answers the client, elements with a timeout
  no shorter than the DNS cache's maximum TTL. This is the zero-race path.

``key`` is the sorted ports joined by ``_`` (``443_80`` sorts as text: ``"443_80"``? no:
numerically, ``80_443``).
"""

from __future__ import annotations

import ipaddress
from functools import cache

#: the address types every network module shares (one definition, here)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: a sorted tuple of TCP ports: the key of a port group (``(80, 443)``)
Ports = tuple[int, ...]

TABLE = "codetainer"
FAMILY = "inet"
DEFAULT_PORTS: tuple[int, ...] = (80, 443)


def port_key(ports: tuple[int, ...]) -> str:
    return "_".join(str(p) for p in sorted(set(ports)))


def static_set(family: int, ports: tuple[int, ...]) -> str:
    """Name of the static set for IPv4 (family=4) or IPv6 (family=6)."""
    return f"s{family}_{port_key(ports)}"


def dynamic_set(family: int, ports: tuple[int, ...]) -> str:
    return f"d{family}_{port_key(ports)}"


def ipset_name(set_name: str) -> str:
    """The iptables backend's ipset for one of the names above (max 31 chars)."""
    return f"ct-{set_name}"[:31]


#: Destinations a *name* may never open, whatever it resolves to: loopback, "this
#: network", RFC 1918, carrier-grade NAT, link-local (cloud metadata at 169.254.169.254),
#: multicast and reserved; for IPv6 loopback, unspecified, IPv4-mapped, link-local,
#: multicast and Fly's private network fdaa::/16 (other Machines of the organisation and
#: the Machines API). A DNS answer pointing there (rebinding, or an attacker's record
#: under an allowlisted wildcard) is not allowed; an explicit CIDR entry still is.
#: Other unique-local IPv6 (fd00::/8) is left to the allowlist: the test world lives there.
INTERNAL: dict[int, tuple[str, ...]] = {
    4: ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4"),
    6: ("::/127", "::ffff:0:0/96", "fe80::/10", "ff00::/8", "fdaa::/16"),
}


@cache
def _internal_nets() -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n) for v in (4, 6) for n in INTERNAL[v])


def is_internal(addr: str) -> bool:
    """True for an address a name may not open (see :data:`INTERNAL`); False for garbage
    too (validation is the caller's, this only screens)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in _internal_nets())
