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
