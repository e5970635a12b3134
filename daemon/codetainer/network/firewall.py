"""Default-deny egress firewall: the backend interface, probing, self-test.

The policy is a plain value (:class:`FirewallPolicy`, :mod:`.firewall_policy`, whose
names this module re-exports) whose every address has been through :mod:`ipaddress`
(construction fails otherwise), so nothing unvalidated can reach the rule text the
backends render. Two backends implement it:

* ``nftables`` (:mod:`.firewall_nft`): our own table ``inet codetainer``;
* ``iptables`` (:mod:`.firewall_ipt`): chains ``CODETAINER-*`` plus ipsets ``ct-*``,
  for kernels without nf_tables.

Both filter egress *and* ingress: nothing comes in but replies to connections the
container opened (conntrack, reply direction), loopback, IPv6 link plumbing and the
explicit exceptions the policy carries (:class:`InboundPort`, Fly's stateless SSH).

:func:`probe_backend` picks one by asking the kernel; :func:`make_backend` builds it.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from codetainer.boot.seccomp import loader_argv
from codetainer.network import nftprobe
from codetainer.network.firewall_base import (
    BACKENDS,
    Denied,
    FirewallBackend,
    FirewallError,
    FirewallStatus,
    Runner,
    member_of,
)
from codetainer.network.firewall_policy import (
    FLY_NETWORK,
    FLY_RESOLVER,
    INBOUND_FORM,
    IPV6_POLICIES,
    PROXIED_PORTS,
    DnsLimit,
    FirewallPolicy,
    InboundPort,
    PortGroup,
    check_port,
    parse_address,
    parse_inbound,
    parse_network,
    rendered,
)
from codetainer.network.model import IPAddress, IPNetwork

#: the policy's names are re-exported: callers import them from here
__all__ = [
    "BACKENDS",
    "FLY_NETWORK",
    "FLY_RESOLVER",
    "INBOUND_FORM",
    "IPV6_POLICIES",
    "PROXIED_PORTS",
    "Denied",
    "DnsLimit",
    "FirewallBackend",
    "FirewallError",
    "FirewallPolicy",
    "FirewallStatus",
    "IPAddress",
    "IPNetwork",
    "InboundPort",
    "PortGroup",
    "Runner",
    "SelfTestResult",
    "make_backend",
    "member_of",
    "parse_address",
    "parse_inbound",
    "parse_network",
    "probe_backend",
    "rendered",
    "self_test",
]

log = structlog.get_logger("codetainer.network")

# -- choosing a backend --------------------------------------------------------------------


async def _probe_nftables(runner: Runner, nat: bool) -> str:
    """Empty string when nf_tables supports everything we use, else the reason."""
    if shutil.which("nft") is None and not runner.wrap:
        return "nft is not installed"
    # codetainerd's entrypoint may have started it already (the same transaction)
    early = None if runner.wrap else await nftprobe.collect(nat, runner.timeout)
    if early is not None:
        rc, err = early
    else:
        rc, _out, err = await runner.run(["nft", "-f", "-"], nftprobe.script(nat), check=False)
    return "" if rc == 0 else (err.strip() or f"nft exited {rc}")


async def _probe_iptables(runner: Runner, nat: bool) -> str:
    from codetainer.network.firewall_ipt import iptables_tools

    tools = iptables_tools()
    for tool in (tools[0], "ipset"):
        if shutil.which(tool) is None and not runner.wrap:
            return f"{tool} is not installed"
    for table in ("filter", "nat") if nat else ("filter",):
        rc, _o, err = await runner.run([tools[0], "-w", "-t", table, "-S", "OUTPUT"], check=False)
        if rc != 0:
            return err.strip() or f"{tools[0]} -t {table} exited {rc}"
    rc, _o, err = await runner.run(["ipset", "list", "-n"], check=False)
    return "" if rc == 0 else (err.strip() or f"ipset exited {rc}")


async def probe_backend(setting: str = "auto", runner: Runner | None = None, *, nat: bool = False) -> str:
    """``nftables`` or ``iptables``: the setting when forced, else what the kernel supports
    (``nat``: the policy proxy's redirect too)."""
    runner = runner or Runner()
    if setting in BACKENDS:
        return setting
    if setting != "auto":
        raise FirewallError(
            f"CODETAINER_FIREWALL={setting!r} is not a backend: use auto, nftables or iptables"
        )
    nft_problem = await _probe_nftables(runner, nat)
    if not nft_problem:
        log.info("firewall_probe", backend="nftables")
        return "nftables"
    ipt_problem = await _probe_iptables(runner, nat)
    if not ipt_problem:
        log.warning("firewall_probe", backend="iptables", nftables_problem=nft_problem[:500])
        return "iptables"
    raise FirewallError(
        f"no usable firewall backend: nftables: {nft_problem[:500]}; iptables: {ipt_problem[:500]}; "
        "the kernel needs nf_tables or ip_tables with ipset support"
        + (" and NAT (the policy proxy's redirect; or CODETAINER_PROXY=off)" if nat else "")
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
#: The self-test's probe, run as the agent by ``python3 -I -S``: ``_socket``, not
#: ``socket`` (whose enums cost 10 ms of an interpreter that lives 20), and no ``json``:
#: its arguments are plain argv (ALLOWED_HOST PORT DENIED_HOST PORT TIMEOUT UDP_WAIT
#: REDIRECT_PORT|0 UPSTREAM...), its answer one Python literal on stdout.
_SELFTEST_CHILD = r"""
import _socket as S, errno, sys, time
ah, ap, dh, dp, tmo, uw, rd, *ups = sys.argv[1:]
udp_wait, redirect = float(uw), int(rd)
def gone(e):
    return errno.errorcode.get(e.errno or 0, type(e).__name__)
def connect(host, port, timeout):
    err = None
    for fam, typ, proto, _, sa in S.getaddrinfo(host, port, 0, S.SOCK_STREAM):
        s = S.socket(fam, typ, proto)
        try:
            s.settimeout(timeout)
            s.connect(sa)
            return s
        except OSError as e:
            err = e
            s.close()
    raise err or OSError("getaddrinfo returned nothing")
def tcp(host, port, timeout):
    t = time.monotonic()
    try:
        connect(host, port, timeout).close()
    except TimeoutError:
        return ["timeout", (time.monotonic() - t) * 1000]
    except OSError as e:
        return [gone(e), (time.monotonic() - t) * 1000]
    return ["connected", (time.monotonic() - t) * 1000]
QUERY = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
def udp(host):
    s = S.socket(S.AF_INET6 if ":" in host else S.AF_INET, S.SOCK_DGRAM)
    s.settimeout(udp_wait)
    try:
        s.sendto(QUERY, (host, 53))
        s.recv(512)
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return gone(e)
    finally:
        s.close()
    return "answered"
def listener(host, port):
    # The proxy's transparent port, held for the probe: where the redirect must land.
    v6 = ":" in host
    s = S.socket(S.AF_INET6 if v6 else S.AF_INET, S.SOCK_STREAM)
    s.setsockopt(S.SOL_SOCKET, S.SO_REUSEADDR, 1)
    try:
        s.bind(("::1" if v6 else "127.0.0.1", port))
        s.listen(4)
    except OSError:
        s.close()
        return None
    return s
def original(c, v6):
    # SO_ORIGINAL_DST (80): sockaddr_in, or sockaddr_in6 for IPv6 (level IPPROTO_IPV6)
    raw = c.getsockopt(41 if v6 else 0, 80, 28 if v6 else 16)
    addr = S.inet_ntop(S.AF_INET6, raw[8:24]) if v6 else S.inet_ntop(S.AF_INET, raw[4:8])
    return f"{addr}:{int.from_bytes(raw[2:4], 'big')}"
def redirected(lst, v6):
    if lst is None:
        return "in use"
    lst.settimeout(1.0)
    try:
        fd, _ = lst._accept()
    except TimeoutError:
        return ""
    c = S.socket(S.AF_INET6 if v6 else S.AF_INET, S.SOCK_STREAM, 0, fd)
    try:
        return original(c, v6)
    except OSError as e:
        return "no original destination (" + errno.errorcode.get(e.errno or 0, "error") + ")"
    finally:
        c.close()
        lst.close()
lst = listener(ah, redirect) if redirect else None
out = {"allowed": tcp(ah, int(ap), float(tmo)),
       "denied": tcp(dh, int(dp), float(tmo)),
       "dns": {u: [udp(u), tcp(u, 53, udp_wait)[0]] for u in ups}}
if redirect:
    out["redirected"] = redirected(lst, ":" in ah)
print(repr(out))
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
    #: with the policy proxy: the original destination of the allowed probe's connection
    #: as it arrived on the transparent port; "" if it did not, "in use" if the proxy
    #: holds the port already (nothing to check); None: not checked
    redirected: str | None = None

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
        if self.redirected is not None and self.redirected not in (self.allowed_target, "in use"):
            seen = f"arrived for {self.redirected}" if self.redirected else "never arrived"
            out.append(f"allowed probe {self.allowed_target} was not redirected to the policy "
                       f"proxy's transparent port ({seen}): the agent's HTTPS would bypass the proxy")
        for up, (udp, tcp) in self.dns.items():
            if udp == "answered" or tcp == "connected":
                out.append(f"direct DNS to upstream {up} is not blocked (udp {udp}, tcp {tcp})")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def _hostport(value: tuple[str, int]) -> list[object]:
    host, port = value
    check_port(port)
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
    redirect_port: int | None = None,
) -> SelfTestResult:
    """Probe the live firewall from ``uid``; check :meth:`SelfTestResult.problems`.

    ``redirect_port``: the policy proxy's transparent port. Where the allowed probe's port
    is one the proxy takes (80, 443), the probe holds that port itself (the proxy starts
    later) and checks that its connection arrives there, for the allowed destination."""
    runner = runner or Runner(timeout=timeout * 3 + 10)
    redirect = check_port(redirect_port) if redirect_port and allowed[1] in PROXIED_PORTS else None
    args = [*_hostport(allowed), *_hostport(denied), timeout, 1.0, redirect or 0,
            *(rendered(parse_address(u)) for u in upstreams)]
    argv = [
        "setpriv", f"--reuid={int(uid)}", f"--regid={int(gid)}", "--clear-groups",
        *loader_argv(),  # the agent's seccomp filter: no uid-1000 process goes without it
        "/usr/bin/python3", "-I", "-S", "-c", _SELFTEST_CHILD, *(str(a) for a in args),
    ]
    _rc, out, _err = await runner.run(argv, what="firewall self-test")
    try:
        data = ast.literal_eval(out.strip())
        result = SelfTestResult(
            allowed=str(data["allowed"][0]),
            allowed_ms=float(data["allowed"][1]),
            denied=str(data["denied"][0]),
            denied_ms=float(data["denied"][1]),
            dns={str(k): (str(v[0]), str(v[1])) for k, v in data["dns"].items()},
            denied_max_ms=denied_max_ms,
            allowed_target=f"{allowed[0]}:{allowed[1]}",
            denied_target=f"{denied[0]}:{denied[1]}",
            redirected=str(data["redirected"]) if redirect else None,
        )
    except (ValueError, KeyError, IndexError, TypeError, SyntaxError, MemoryError,
            RecursionError) as exc:
        raise FirewallError(f"firewall self-test printed garbage ({exc}): {out[:300]!r}") from None
    log.info(
        "firewall_selftest",
        ok=result.ok,
        allowed=result.allowed,
        allowed_ms=round(result.allowed_ms, 1),
        denied=result.denied,
        denied_ms=round(result.denied_ms, 1),
        redirected=result.redirected,
    )
    return result
