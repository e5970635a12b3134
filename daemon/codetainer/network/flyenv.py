"""Is this a Fly Machine? ``CODETAINER_IPV6=auto`` decides from evidence the agent cannot fake.

``fly ssh console`` reaches a Machine over Fly's private IPv6 network (6PN, fdaa::/16),
through a kernel without IPv6 connection tracking: the default-deny firewall must then
let Fly's SSH in and its replies out statelessly (the ``fly`` policy), and nowhere else
should it. So ``auto`` means ``fly`` on a Fly Machine and ``deny`` everywhere else, and a
Fly Machine is recognised by two pieces of evidence, both required:

* ``FLY_MACHINE_ID`` in the daemon's own environment, as it started (Fly's init sets it;
  no process of the agent can change the environment of a root process);
* an address in fdaa::/16 on an interface of the daemon's own network namespace (Fly
  puts the Machine's 6PN address, ``FLY_PRIVATE_IP``, on eth0), read over netlink: the
  agent, without CAP_NET_ADMIN, cannot add one.

``FLY_APP_NAME`` alone proves nothing (the sandbox sets it, for error messages). The
netlink read (pyroute2, whose import costs ~0.2 s) only happens when the environment
already says Fly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from codetainer.network.firewall import FLY_NETWORK, IPV6_POLICIES

#: the values ``CODETAINER_IPV6`` accepts
IPV6_SETTINGS = ("auto", *IPV6_POLICIES)
#: the variables of Fly's runtime environment the daemon keeps from its start
FLY_ENV = ("FLY_MACHINE_ID", "FLY_PRIVATE_IP")


def parse_ipv6_setting(raw: str) -> str:
    """``CODETAINER_IPV6`` as one of :data:`IPV6_SETTINGS`, or ``ValueError`` naming both."""
    value = raw.strip().lower()
    if value not in IPV6_SETTINGS:
        raise ValueError(f"CODETAINER_IPV6={raw[:20]!r} is not a policy: use one of "
                         f"{', '.join(IPV6_SETTINGS)}")
    return value


def fly_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The Fly variables of ``environ`` (the daemon's, read once at start)."""
    return {k: environ[k] for k in FLY_ENV if environ.get(k)}


@dataclass(frozen=True)
class FlyEvidence:
    """What the daemon found: its Fly variables and the fdaa::/16 addresses of its netns."""

    env: Mapping[str, str]
    #: (interface, address) of every fdaa::/16 address, FLY_PRIVATE_IP's first
    addresses: tuple[tuple[str, str], ...] = ()
    #: the netlink read failed: why (the addresses are then unknown, so: not Fly)
    error: str = ""


def fly_addresses(pairs: list[tuple[str, str]], private_ip: str = "") -> tuple[tuple[str, str], ...]:
    """The (interface, address) pairs inside fdaa::/16; ``private_ip``'s first."""
    found = []
    for ifname, addr in pairs:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            continue
        if ip.version == 6 and ip in FLY_NETWORK:
            found.append((ifname, str(ip)))
    return tuple(sorted(found, key=lambda p: (p[1] != private_ip, p)))


def interface_addresses() -> list[tuple[str, str]]:
    """(interface, address) of every IPv6 address in this network namespace (netlink)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        return [(names.get(msg["index"], f"if{msg['index']}"), str(msg.get_attr("IFA_ADDRESS")))
                for msg in ipr.get_addr(family=socket.AF_INET6)]


def read_evidence(env: Mapping[str, str]) -> FlyEvidence:
    """Blocking: the netns is read only when ``env`` says Fly (see :func:`gather`)."""
    if not env.get("FLY_MACHINE_ID"):
        return FlyEvidence(env)
    try:
        pairs = interface_addresses()
    except (OSError, ImportError) as exc:
        return FlyEvidence(env, error=f"cannot read the interfaces over netlink: {exc}")
    return FlyEvidence(env, fly_addresses(pairs, env.get("FLY_PRIVATE_IP", "")))


async def gather(env: Mapping[str, str]) -> FlyEvidence:
    """:func:`read_evidence` off the event loop (pyroute2's sync API runs a loop of its
    own), and without a thread at all where the environment does not say Fly."""
    if not env.get("FLY_MACHINE_ID"):
        return FlyEvidence(env)
    return await asyncio.to_thread(read_evidence, env)


@dataclass(frozen=True)
class Ipv6Choice:
    """The IPv6 policy in force and why (``status`` shows both)."""

    policy: str
    why: str

    def __str__(self) -> str:
        return f"{self.policy} ({self.why})"


def choose_ipv6(setting: str, evidence: FlyEvidence | None = None) -> Ipv6Choice:
    """The policy for a parsed ``CODETAINER_IPV6``: as set, or ``auto``'s verdict."""
    if setting != "auto":
        return Ipv6Choice(setting, "set by CODETAINER_IPV6")
    ev = evidence or FlyEvidence({})
    if not ev.env.get("FLY_MACHINE_ID"):
        return Ipv6Choice("deny", "auto: not a Fly Machine, FLY_MACHINE_ID is not set")
    if ev.error:
        return Ipv6Choice("deny", f"auto: FLY_MACHINE_ID set but {ev.error}")
    if not ev.addresses:
        return Ipv6Choice("deny", "auto: FLY_MACHINE_ID set but no fdaa::/16 (6PN) address on "
                          "any interface, so not a Fly Machine")
    where = ", ".join(f"{addr} on {ifname}" for ifname, addr in ev.addresses[:2])
    return Ipv6Choice("fly", f"auto: FLY_MACHINE_ID set, {where}")
