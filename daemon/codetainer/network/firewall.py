"""Default-deny egress firewall: the policy, the backend interface, probing, self-test.

The policy is a plain value (:class:`FirewallPolicy`) whose every address has been
through :mod:`ipaddress` (construction fails otherwise), so nothing unvalidated can
reach the rule text the backends render. Two backends implement it:

* ``nftables`` (:mod:`.firewall_nft`): our own table ``inet codetainer``;
* ``iptables`` (:mod:`.firewall_ipt`): chains ``CODETAINER-*`` plus ipsets ``ct-*``,
  for kernels without nf_tables.

Both filter egress *and* ingress: nothing comes in but replies to connections the
container opened (conntrack, reply direction), loopback, IPv6 link plumbing and the
explicit exceptions the policy carries (:class:`InboundPort`, Fly's stateless SSH).

:func:`probe_backend` picks one by asking the kernel; :func:`make_backend` builds it.
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
import json
import shutil
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from codetainer.network import model

log = structlog.get_logger("codetainer.network")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IPV6_POLICIES = ("deny", "fly", "allowlist")
INBOUND_PROTOCOLS = ("tcp", "udp")
INBOUND_FORM = "comma-separated tcp/PORT or udp/PORT (e.g. tcp/8080,udp/5353)"
BACKENDS = ("nftables", "iptables")
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


def _port(value: object) -> int:
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
        _port(self.port)

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
        ports = tuple(sorted({_port(p) for p in self.ports}))
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

    def __post_init__(self) -> None:
        if any(not isinstance(g, PortGroup) for g in self.groups):
            raise ValueError("groups must be PortGroup values")
        keys = [g.key for g in self.groups]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate port groups: {sorted(keys)}; merge them first")
        if isinstance(self.dns_uid, bool) or not isinstance(self.dns_uid, int):
            raise ValueError(f"dns_uid {self.dns_uid!r} is not an integer uid")
        if not 0 <= self.dns_uid < 2**32 - 1:
            raise ValueError(f"dns_uid {self.dns_uid} is out of range")
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
            object.__setattr__(self, "dns_hook", (parse_address(addr), _port(port)))

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

    def shape(self) -> FirewallPolicy:
        """The policy without static addresses: equal shapes mean a set refresh suffices."""
        return replace(self, groups=tuple(PortGroup(g.ports) for g in self.groups))


# -- what backends report ------------------------------------------------------------------


@dataclass(frozen=True)
class Denied:
    """One denied destination as the kernel recorded it."""

    addr: str
    proto: str
    port: int
    packets: int
    #: seconds until the record expires; ``seen_ago = denied_timeout - expires_in``
    expires_in: float
    seen_ago: float = 0.0
    #: iptables cannot refresh an element's timeout without resetting its counters, so
    #: there ``seen_ago`` is the first packet's, not the last one's
    first_seen: bool = False

    @property
    def seen(self) -> str:
        return "first" if self.first_seen else "last"


@dataclass(frozen=True)
class FirewallStatus:
    backend: str
    active: bool
    #: element count per set
    sets: dict[str, int] = field(default_factory=dict)
    detail: str = ""


# -- running the tools ---------------------------------------------------------------------


class Runner:
    """Runs firewall tools; ``wrap`` prefixes every command (tests: ``ip netns exec NS``)."""

    def __init__(self, wrap: Sequence[str] = (), timeout: float = 20.0) -> None:
        self.wrap = tuple(wrap)
        self.timeout = timeout

    async def run(
        self, argv: Sequence[str], stdin: str | None = None, *, check: bool = True, what: str = ""
    ) -> tuple[int, str, str]:
        cmd = [*self.wrap, *argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise FirewallError(
                f"{cmd[0]} is not installed: install it, or choose the other backend with "
                "CODETAINER_FIREWALL=nftables|iptables"
            ) from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), self.timeout
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise FirewallError(
                f"{argv[0]} did not finish within {self.timeout:.0f}s ({what or argv[0]}): "
                "the kernel or the tool is stuck; check `dmesg` and retry"
            ) from None
        rc = proc.returncode if proc.returncode is not None else -1
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if check and rc != 0:
            raise FirewallError(
                f"{' '.join(argv[:3])} failed ({what or 'firewall command'}), exit {rc}: "
                f"{stderr.strip()[:2000] or '(no message)'}; check that the kernel supports it "
                "(CODETAINER_FIREWALL=iptables selects the fallback backend)"
            )
        return rc, stdout, stderr


class FirewallBackend(abc.ABC):
    """The interface both backends implement; every method is safe to call repeatedly."""

    name: str = ""

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or Runner()
        self.applied: FirewallPolicy | None = None

    @abc.abstractmethod
    async def apply(self, policy: FirewallPolicy, *, fresh: bool = False) -> None:
        """Install or replace the whole policy in one atomic step; keeps established flows.

        The DNS-filled (dynamic) sets keep their elements (a reload must not forget what
        the DNS server handed out), unless ``fresh``: a boot starts them empty, since a
        table left by an earlier daemon may hold names that are no longer allowed."""

    @abc.abstractmethod
    async def _replace_static(self, policy: FirewallPolicy) -> None:
        """Replace the static sets' contents atomically."""

    async def update_sets(self, policy: FirewallPolicy) -> None:
        """Refresh: swap the static sets' contents; a full :meth:`apply` if the shape changed."""
        if self.applied is None or self.applied.shape() != policy.shape():
            log.info("firewall_reapply", backend=self.name, reason="policy shape changed")
            await self.apply(policy)
            return
        await self._replace_static(policy)
        self.applied = policy

    @abc.abstractmethod
    async def read_denied(self) -> list[Denied]:
        """Denied destinations, most packets first."""

    @abc.abstractmethod
    async def status(self) -> FirewallStatus: ...

    @abc.abstractmethod
    async def contains(self, addr: str) -> list[str]:
        """Names of our sets (model names like ``s4_80_443``) that contain ``addr``."""

    @abc.abstractmethod
    async def teardown(self) -> None:
        """Remove everything this backend installed (nothing else)."""


def member_of(addr: IPAddress, elements: Iterable[IPNetwork]) -> bool:
    return any(addr.version == n.version and addr in n for n in elements)


# -- choosing a backend --------------------------------------------------------------------

_PROBE_TABLE = "codetainer_probe"
_PROBE_RULES = f"""\
add table inet {_PROBE_TABLE}
add set inet {_PROBE_TABLE} s {{ type ipv4_addr; flags interval; }}
add set inet {_PROBE_TABLE} d {{ type ipv4_addr; flags timeout; timeout 60s; }}
add set inet {_PROBE_TABLE} n {{ type ipv6_addr . inet_proto . inet_service; \
flags dynamic,timeout; timeout 60s; counter; size 16; }}
add chain inet {_PROBE_TABLE} c {{ type filter hook output priority filter; policy accept; }}
add rule inet {_PROBE_TABLE} c ct direction original ct state established,related accept
add rule inet {_PROBE_TABLE} c meta skuid 0 ip daddr @s accept
add rule inet {_PROBE_TABLE} c ip6 daddr . meta l4proto . th dport @n counter
add rule inet {_PROBE_TABLE} c meta l4proto tcp update @n {{ ip6 daddr . meta l4proto . th dport }}
add rule inet {_PROBE_TABLE} c meta l4proto tcp ip6 daddr ::2 reject with tcp reset
add rule inet {_PROBE_TABLE} c ip6 daddr ::2 reject with icmpx type admin-prohibited
delete table inet {_PROBE_TABLE}
"""


async def _probe_nftables(runner: Runner) -> str:
    """Empty string when nf_tables supports everything we use, else the reason."""
    if shutil.which("nft") is None and not runner.wrap:
        return "nft is not installed"
    # Everything in one transaction that deletes what it created: nothing is left behind.
    rc, _out, err = await runner.run(["nft", "-f", "-"], _PROBE_RULES, check=False)
    return "" if rc == 0 else (err.strip() or f"nft exited {rc}")


async def _probe_iptables(runner: Runner) -> str:
    from codetainer.network.firewall_ipt import iptables_tools

    tools = iptables_tools()
    for tool in (tools[0], "ipset"):
        if shutil.which(tool) is None and not runner.wrap:
            return f"{tool} is not installed"
    rc, _o, err = await runner.run([tools[0], "-w", "-S", "OUTPUT"], check=False)
    if rc != 0:
        return err.strip() or f"{tools[0]} exited {rc}"
    rc, _o, err = await runner.run(["ipset", "list", "-n"], check=False)
    return "" if rc == 0 else (err.strip() or f"ipset exited {rc}")


async def probe_backend(setting: str = "auto", runner: Runner | None = None) -> str:
    """``nftables`` or ``iptables``: the setting when forced, else what the kernel supports."""
    runner = runner or Runner()
    if setting in BACKENDS:
        return setting
    if setting != "auto":
        raise FirewallError(
            f"CODETAINER_FIREWALL={setting!r} is not a backend: use auto, nftables or iptables"
        )
    nft_problem = await _probe_nftables(runner)
    if not nft_problem:
        log.info("firewall_probe", backend="nftables")
        return "nftables"
    ipt_problem = await _probe_iptables(runner)
    if not ipt_problem:
        log.warning("firewall_probe", backend="iptables", nftables_problem=nft_problem[:500])
        return "iptables"
    raise FirewallError(
        f"no usable firewall backend: nftables: {nft_problem[:500]}; iptables: {ipt_problem[:500]}; "
        "the kernel needs nf_tables or ip_tables with ipset support"
    )


def make_backend(name: str, runner: Runner | None = None) -> FirewallBackend:
    if name == "nftables":
        from codetainer.network.firewall_nft import NftablesBackend

        return NftablesBackend(runner)
    if name == "iptables":
        from codetainer.network.firewall_ipt import IptablesBackend

        return IptablesBackend(runner)
    raise FirewallError(f"unknown firewall backend {name!r}: use nftables or iptables")


# -- self-test -----------------------------------------------------------------------------

# Runs as the agent's uid; stdlib only; prints one JSON object.
_SELFTEST_CHILD = r"""
import errno, json, socket, sys, time
a = json.loads(sys.argv[1])
def tcp(host, port, timeout):
    t = time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        return ["timeout", (time.monotonic() - t) * 1000]
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, type(e).__name__)
        return [name, (time.monotonic() - t) * 1000]
    s.close()
    return ["connected", (time.monotonic() - t) * 1000]
QUERY = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
def udp(host):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(a["udp_wait"])
    try:
        s.sendto(QUERY, (host, 53))
        s.recv(512)
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, type(e).__name__)
    finally:
        s.close()
    return "answered"
out = {"allowed": tcp(a["allowed"][0], a["allowed"][1], a["timeout"]),
       "denied": tcp(a["denied"][0], a["denied"][1], a["timeout"]),
       "dns": {u: [udp(u), tcp(u, 53, a["udp_wait"])[0]] for u in a["upstreams"]}}
print(json.dumps(out))
"""

_REFUSED = ("ECONNREFUSED", "ECONNRESET", "EPERM", "EACCES", "EHOSTUNREACH", "ENETUNREACH")


@dataclass(frozen=True)
class SelfTestResult:
    allowed: str
    allowed_ms: float
    denied: str
    denied_ms: float
    #: upstream -> (udp outcome, tcp outcome)
    dns: dict[str, tuple[str, str]]
    denied_max_ms: float = 1000.0
    #: the probe targets, host:port, for the messages
    allowed_target: str = "allowed probe"
    denied_target: str = "denied probe"

    def problems(self) -> list[str]:
        out = []
        if self.allowed != "connected":
            out.append(
                f"allowed probe {self.allowed_target} did not connect ({self.allowed} after "
                f"{self.allowed_ms:.0f} ms): "
                "check the allowlist, the DNS server and the probe target"
            )
        if self.denied not in _REFUSED:
            out.append(f"denied probe {self.denied_target} was not refused ({self.denied}): "
                       "the firewall is not filtering")
        elif self.denied_ms > self.denied_max_ms:
            out.append(f"denied probe {self.denied_target} refused only after {self.denied_ms:.0f} ms "
                       "(want fast reject)")
        for up, (udp, tcp) in self.dns.items():
            if udp == "answered" or tcp == "connected":
                out.append(f"direct DNS to upstream {up} is not blocked (udp {udp}, tcp {tcp})")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def _hostport(value: tuple[str, int]) -> list[object]:
    host, port = value
    _port(port)
    if not host or len(host) > 253 or any(c.isspace() or ord(c) < 33 for c in host):
        raise ValueError(f"probe host {host!r} is not a host name or address")
    return [host, port]


async def self_test(
    uid: int,
    gid: int,
    allowed: tuple[str, int],
    denied: tuple[str, int],
    upstreams: Sequence[str],
    *,
    runner: Runner | None = None,
    timeout: float = 5.0,
    denied_max_ms: float = 1000.0,
) -> SelfTestResult:
    """Probe the live firewall from ``uid``; check :meth:`SelfTestResult.problems`."""
    runner = runner or Runner(timeout=timeout * 3 + 10)
    args = {
        "allowed": _hostport(allowed),
        "denied": _hostport(denied),
        "upstreams": [rendered(parse_address(u)) for u in upstreams],
        "timeout": timeout,
        "udp_wait": 1.0,
    }
    argv = [
        "setpriv", f"--reuid={int(uid)}", f"--regid={int(gid)}", "--clear-groups",
        "/usr/bin/python3", "-I", "-c", _SELFTEST_CHILD, json.dumps(args),
    ]  # fmt: skip
    _rc, out, _err = await runner.run(argv, what="firewall self-test")
    try:
        data = json.loads(out)
        result = SelfTestResult(
            allowed=str(data["allowed"][0]),
            allowed_ms=float(data["allowed"][1]),
            denied=str(data["denied"][0]),
            denied_ms=float(data["denied"][1]),
            dns={str(k): (str(v[0]), str(v[1])) for k, v in data["dns"].items()},
            denied_max_ms=denied_max_ms,
            allowed_target=f"{allowed[0]}:{allowed[1]}",
            denied_target=f"{denied[0]}:{denied[1]}",
        )
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise FirewallError(f"firewall self-test printed garbage ({exc}): {out[:300]!r}") from None
    log.info(
        "firewall_selftest",
        ok=result.ok,
        allowed=result.allowed,
        allowed_ms=round(result.allowed_ms, 1),
        denied=result.denied,
        denied_ms=round(result.denied_ms, 1),
    )
    return result
