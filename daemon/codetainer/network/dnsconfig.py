"""Configs for the local DNS server (dnsmasq or CoreDNS), generated from an Allowlist.

Only validated allowlist entries (``[a-z0-9.-]`` names) and values parsed here
(addresses, ports, user names) are written; nothing else reaches a config.

dnsmasq (verified with 2.90 real queries, ``tests/integration/test_dns_engines.py``):

* ``address=/#/`` answers NXDOMAIN for every name no more specific line claims;
* exact ``N``: ``server=/N/UP`` forwards N *and its subdomains*, so
  ``local=/*.N/`` (``*.`` = subdomains only, dnsmasq >= 2.86) takes the subdomains
  back to NXDOMAIN, unless a wildcard entry allows them;
* wildcard ``*.W``: ``server=/*.W/UP`` forwards subdomains, the apex stays NXDOMAIN;
* ``nftset=``/``ipset=`` do not understand ``*.``: they use ``/D/`` and the
  longest match wins, so the dynamic set of a domain gets the union of the ports of
  the entries that meet there (an exact name and a wildcard over it). Refused names
  never get an answer, hence never an address in a set;
* AAAA: ``filter-AAAA`` (dnsmasq >= 2.90) empties AAAA answers unless IPv6 is on;
* internal answers: one ``bogus-nxdomain=NET`` per network of ``model.INTERNAL`` (less
  what an explicit CIDR entry allows, :func:`screened_networks`). dnsmasq checks every
  A/AAAA record of the answer (the CNAME chain too) against them *before* it fills any
  set, and turns a hit into NXDOMAIN (logged ``config NAME is NXDOMAIN``, so it shows as
  a refused name), over UDP and TCP alike. ``stop-dns-rebind`` is not used: in 2.90 it
  lets 100.64.0.0/10, 224.0.0.0/4 and 240.0.0.0/4 into the sets and refuses the
  documentation ranges and all of fc00::/7, which the allowlist may open;
* dnsmasq fills the set only when it asks upstream (cache miss), and re-adding an
  existing element does not refresh its timeout. Clients are told at most
  ``max_ttl`` (= ``max-cache-ttl``), so an address answered at t0 is used until
  t0 + 2*max_ttl at the latest; the set timeout is that plus a minute. The refresh
  task's static sets (with their grace period) cover addresses that stay in use.
* refused names: ``log-queries=extra`` to stderr; :func:`parse_dnsmasq_log_line`
  turns ``config NAME is NXDOMAIN`` lines into :class:`RefusedQuery`.

CoreDNS (verified with 1.12.1, built by ``./dev setup``, real queries in
``tests/integration/test_dns_engines.py``): one server block per domain (zones match
subdomains label by label, so an exact entry's block starts with a ``template`` that
answers NXDOMAIN for ``^.+[.]N[.]$`` and falls through otherwise; a wildcard-only block
refuses its apex the same way; the query name the regex sees is lower-cased, escapes
such as ``a\\.b`` kept), a catch-all ``.`` block answering NXDOMAIN, ``template IN
AAAA`` (empty NOERROR) unless IPv6 is on, and ``forward`` to the upstreams or, for the
zero-race path, to the daemon's forwarding hook (which fills the dynamic sets and turns
internal answers into NXDOMAIN, as dnsmasq's ``bogus-nxdomain=`` does).

* ``cache MAX_TTL``: CoreDNS caps the TTL of the reply it forwards too, so clients are
  told at most ``max_ttl`` as with dnsmasq and the same set timeout holds. ``success``/
  ``denial 10000 MAX_TTL 0``: dnsmasq's cache size, and a shorter upstream TTL is kept
  as it is (CoreDNS raises one under 5 s to 5 s by default, which hides a CDN's
  rotation from clients); ``servfail 0s``: a failed insertion or an upstream outage is
  not served from the cache (5 s by default), the next query tries again;
* refused names: ``log`` lines ``CT_DENIAL <kind> <zone> <client> <type> <name>
  <rcode>`` (:func:`parse_coredns_log_line`). ``class denial error``: a template's
  NXDOMAIN carries no SOA, which CoreDNS classes as an *error*, not a denial.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import shlex
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from codetainer import runner
from codetainer.network.allowlist import Allowlist
from codetainer.network.dnsplan import DnsPlan, DynamicSet, set_timeout_for
from codetainer.network.model import (
    FAMILY,
    TABLE,
    IPAddress,
    IPNetwork,
)

DEFAULT_LISTEN = "127.0.0.53"
#: where the CoreDNS engine forwards allowlisted zones: the daemon's hook (dnshook.py)
DEFAULT_HOOK = "127.0.0.1:5354"
DEFAULT_MAX_TTL = 300
DNSMASQ_BIN = "/usr/sbin/dnsmasq"
COREDNS_BIN = "coredns"
#: every character a generated config line may contain (comments included)
CONFIG_CHARS = re.compile(r"[A-Za-z0-9 =/#*.:,_\-\[\]{}\"^$+()@?]*\Z")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")


class Engine(enum.StrEnum):
    DNSMASQ = "dnsmasq"
    COREDNS = "coredns"


class SetBackend(enum.StrEnum):
    NFTSET = "nftset"  # nftables backend: dnsmasq nftset=
    IPSET = "ipset"  # iptables backend: dnsmasq ipset=


@dataclass(frozen=True)
class Upstream:
    ip: IPAddress
    port: int = 53

    @property
    def dnsmasq(self) -> str:
        return f"{self.ip}#{self.port}"

    @property
    def hostport(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """``1.1.1.1``, ``1.1.1.1:53``, ``1.1.1.1#53``, ``2606:4700::1111``, ``[…]:53``."""
    raw = text.strip()
    host, port = raw, "53"
    if raw.startswith("["):
        host, _, rest = raw[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("53" if not rest else "x")
    elif "#" in raw:
        host, _, port = raw.partition("#")
    elif raw.count(":") == 1:
        host, _, port = raw.partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"upstream resolver {raw[:60]!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"upstream resolver {raw[:60]!r} has a bad port")
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"upstream resolver {ip} cannot be queried")
    return Upstream(ip, int(port))


def parse_upstreams(value: str | Iterable[str]) -> tuple[Upstream, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    ups = tuple(parse_upstream(i) for i in items if i.strip())
    if not ups:
        raise ValueError("no upstream resolvers: set CODETAINER_UPSTREAMS=8.8.8.8,1.1.1.1")
    return ups


@dataclass(frozen=True)
class DnsOptions:
    listen: str = DEFAULT_LISTEN
    port: int = 53
    upstreams: tuple[Upstream, ...] = field(
        default_factory=lambda: parse_upstreams("8.8.8.8,1.1.1.1")
    )
    ipv6: bool = False
    #: cap of the DNS cache and of the TTL told to clients, seconds
    max_ttl: int = DEFAULT_MAX_TTL
    #: dnsmasq drops root to this user after binding (it keeps CAP_NET_ADMIN for sets)
    user: str | None = None
    group: str | None = None
    #: CoreDNS: forward allowlisted zones here (the daemon's hook) instead of upstreams
    hook: str | None = None

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.listen)  # raises ValueError naming the text
        if not 0 < self.port < 65536:
            raise ValueError(f"DNS listen port {self.port} out of range")
        if not 1 <= self.max_ttl <= 86400:
            raise ValueError(f"DNS max TTL {self.max_ttl} must be 1..86400 seconds")
        for name in (self.user, self.group):
            if name is not None and not _USER.match(name):
                raise ValueError(f"{name[:40]!r} is not a valid user or group name")
        if self.hook is not None:
            parse_upstream(self.hook)
        if not self.upstreams:
            raise ValueError("no upstream resolvers")


@dataclass(frozen=True)
class GeneratedConfig:
    engine: Engine
    text: str
    #: element timeout, seconds, the dynamic sets must be created with
    set_timeout: int
    #: the dynamic sets referenced by the config (dnsmasq) or owed by the hook (CoreDNS)
    dynamic_sets: tuple[DynamicSet, ...]
    #: answers with an address in these become NXDOMAIN before any set is filled (dnsmasq
    #: ``bogus-nxdomain=``; CoreDNS: the daemon's hook)
    screened: tuple[IPNetwork, ...] = ()


def generate_dnsmasq(
    allowlist: Allowlist, options: DnsOptions, sets: SetBackend = SetBackend.NFTSET
) -> GeneratedConfig:
    """dnsmasq's config for ``allowlist`` (the plan built on the way)."""
    return render_dnsmasq(DnsPlan.build(allowlist, ipv6=options.ipv6), options, sets)


def generate_corefile(allowlist: Allowlist, options: DnsOptions) -> GeneratedConfig:
    """CoreDNS's Corefile for ``allowlist`` (the plan built on the way)."""
    return render_corefile(DnsPlan.build(allowlist, ipv6=options.ipv6), options)


def render_dnsmasq(
    plan: DnsPlan, options: DnsOptions, sets: SetBackend | None = SetBackend.NFTSET
) -> GeneratedConfig:
    """dnsmasq's config. ``sets`` None: no ``nftset=``/``ipset=`` lines (dnsmasq standing
    where CoreDNS would, forwarding to the hook, which fills the plan's sets)."""
    lines = [
        "# generated by codetainer from the allowlist: do not edit, edit domains.conf",
        "pid-file=",
        "no-resolv",
        "no-hosts",
        f"listen-address={ipaddress.ip_address(options.listen)}",
        f"port={options.port}",
        "bind-interfaces",
        "cache-size=10000",
        f"max-cache-ttl={options.max_ttl}",
        f"max-ttl={options.max_ttl}",
        "neg-ttl=60",
        "log-queries=extra",
        "log-facility=-",
        "log-async=100",
        # everything not claimed by a more specific line below: NXDOMAIN
        "address=/#/",
    ]
    if options.user:
        lines.append(f"user={options.user}")
    if options.group:
        lines.append(f"group={options.group}")
    if not options.ipv6:
        lines.append("filter-AAAA")
    # Rebinding: an answer pointing inside becomes NXDOMAIN before nftset=/ipset= see it.
    lines.append("# answers with an internal address (model.INTERNAL): NXDOMAIN, no set")
    lines.extend(f"bogus-nxdomain={net}" for net in plan.screened)
    for d in plan.routes:
        lines.append(f"# {d.name} ({d.where})")
        # server=/N/ forwards N and its subdomains; /*.N/ only the subdomains
        pattern = d.name if d.apex else f"*.{d.name}"
        lines.extend(f"server=/{pattern}/{up.dnsmasq}" for up in options.upstreams)
        if not d.subs:
            lines.append(f"local=/*.{d.name}/")
        if sets is SetBackend.NFTSET:
            spec = ",".join(f"{s.family}#{FAMILY}#{TABLE}#{s.name}" for s in d.sets)
            lines.append(f"nftset=/{d.name}/{spec}")
        elif sets is SetBackend.IPSET:
            lines.append(f"ipset=/{d.name}/{','.join(s.ipset for s in d.sets)}")
    text = "\n".join(lines) + "\n"
    _check_chars(text)
    return GeneratedConfig(
        Engine.DNSMASQ, text, set_timeout_for(options.max_ttl), plan.dynamic_sets, plan.screened
    )


def _zone_regex(name: str) -> str:
    return name.replace(".", "[.]")


def render_corefile(plan: DnsPlan, options: DnsOptions) -> GeneratedConfig:
    """CoreDNS's Corefile: one server block per domain of the plan, then the catch-all."""
    bind = ipaddress.ip_address(options.listen)
    if options.hook:
        forward = parse_upstream(options.hook).hostport
    else:
        forward = " ".join(up.hostport for up in options.upstreams)
    out = ["# generated by codetainer from the allowlist: do not edit, edit domains.conf"]
    for d in plan.routes:
        if not d.subs:
            kind, refuse = "exact", f"^.+[.]{_zone_regex(d.name)}[.]$"
        elif not d.apex:
            kind, refuse = "wild", f"^{_zone_regex(d.name)}[.]$"
        else:
            kind, refuse = "both", ""
        out.append(f"# {d.name} ({d.where})")
        out.append(f"{d.name}:{options.port} {{")
        out.append(f"    bind {bind}")
        out.append("    errors")
        if refuse:
            out += [
                "    template ANY ANY {",
                f'        match "{refuse}"',
                "        rcode NXDOMAIN",
                "        fallthrough",
                "    }",
            ]
        if not options.ipv6:
            out += ["    template IN AAAA {", "        rcode NOERROR", "    }"]
        out.append(f"    forward . {forward}")
        ttl = options.max_ttl
        out += [f"    cache {ttl} {{", f"        success 10000 {ttl} 0", f"        denial 10000 {ttl} 0",
                "        servfail 0s", "    }"]
        out += [
            f'    log . "CT_DENIAL {kind} {d.name} {{remote}} {{type}} {{name}} {{rcode}}" {{',
            "        class denial error",
            "    }",
            "}",
        ]
    out += [
        "# everything else",
        f".:{options.port} {{",
        f"    bind {bind}",
        "    errors",
        "    template ANY ANY {",
        "        rcode NXDOMAIN",
        "    }",
        '    log . "CT_DENIAL all . {remote} {type} {name} {rcode}"',
        "}",
    ]
    text = "\n".join(out) + "\n"
    _check_chars(text)
    # Without the hook CoreDNS fills no set (and the firewall denies INTERNAL anyway).
    screened = plan.screened if options.hook else ()
    return GeneratedConfig(
        Engine.COREDNS, text, set_timeout_for(options.max_ttl), plan.dynamic_sets, screened
    )


def _check_chars(text: str) -> None:
    """Defence in depth: a generator bug must not write an unexpected character."""
    for n, line in enumerate(text.split("\n"), start=1):
        if not CONFIG_CHARS.match(line):
            raise RuntimeError(f"generated DNS config line {n} has an unexpected character")


def exec_script(engine: Engine, config_path: str, binary: str | None = None) -> str:
    """The tiny ``/bin/sh`` wrapper the supervised service runs."""
    if engine is Engine.DNSMASQ:
        exe = binary or DNSMASQ_BIN
        args = f"--keep-in-foreground --conf-file={shlex.quote(config_path)}"
    else:
        exe = binary or shutil.which(COREDNS_BIN) or COREDNS_BIN
        args = f"-conf {shlex.quote(config_path)}"
    return f"#!/bin/sh\nexec {shlex.quote(exe)} {args}\n"


async def dnsmasq_version(binary: str = DNSMASQ_BIN) -> tuple[int, int]:
    """``(2, 90)`` from ``dnsmasq --version``; ``filter-AAAA`` needs 2.90 or later."""
    try:
        out = (await runner.run([binary, "--version"], timeout=10)).stdout
    except runner.SpawnError:
        out = ""
    m = re.search(r"Dnsmasq version (\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot tell the version of {binary}: is dnsmasq-base installed?")
    return int(m[1]), int(m[2])


def detect_engine(
    setting: str, which: Callable[[str], str | None] = shutil.which
) -> Engine:
    """``auto``: CoreDNS when a ``coredns`` binary is on PATH, else dnsmasq."""
    value = setting.strip().lower()
    if value == "auto":
        return Engine.COREDNS if which(COREDNS_BIN) else Engine.DNSMASQ
    try:
        return Engine(value)
    except ValueError:
        raise ValueError(
            f"CODETAINER_DNS_ENGINE={setting[:40]!r} is not auto, coredns or dnsmasq"
        ) from None


# --- refused names -------------------------------------------------------------


@dataclass(frozen=True)
class RefusedQuery:
    name: str
    client: str = ""
    qtype: str = ""


_SAFE_NAME = re.compile(r"[\x21-\x7e]{1,255}\Z")
_DNSMASQ_REFUSED = re.compile(
    r"(?:^|\s)(?P<serial>\d+) (?P<client>[0-9a-fA-F.:]+)/\d+ config (?P<name>\S+) is NXDOMAIN\s*$"
)
_DNSMASQ_QUERY = re.compile(
    r"(?:^|\s)(?P<serial>\d+) [0-9a-fA-F.:]+/\d+ query\[(?P<qtype>[A-Za-z0-9]+)\] "
)
_COREDNS = re.compile(
    r"CT_DENIAL (?P<kind>exact|wild|both|all) (?P<zone>\S+) (?P<remote>\S+) "
    r"(?P<qtype>\S+) (?P<name>\S+) (?P<rcode>[A-Z]+)\s*$"
)


def _clean(name: str) -> str | None:
    name = name.rstrip(".").lower()
    return name if _SAFE_NAME.match(name) else None


def parse_dnsmasq_log_line(line: str) -> RefusedQuery | None:
    """A name our config refused (``N client/port config NAME is NXDOMAIN``), or None.

    Upstream NXDOMAIN answers are logged as ``reply`` and are not refusals.
    """
    m = _DNSMASQ_REFUSED.search(line)
    if not m:
        return None
    name = _clean(m["name"])
    return RefusedQuery(name, m["client"]) if name else None


class DnsmasqLogParser:
    """Stateful variant that also reports the query type (from the ``query[T]`` line
    with the same serial number)."""

    def __init__(self, remember: int = 256) -> None:
        self._types: dict[str, str] = {}
        self._remember = remember

    def feed(self, line: str) -> RefusedQuery | None:
        q = _DNSMASQ_QUERY.search(line)
        if q:
            self._types[q["serial"]] = q["qtype"]
            if len(self._types) > self._remember:
                del self._types[next(iter(self._types))]
            return None
        m = _DNSMASQ_REFUSED.search(line)
        if not m:
            return None
        name = _clean(m["name"])
        qtype = self._types.pop(m["serial"], "")
        return RefusedQuery(name, m["client"], qtype) if name else None


def parse_coredns_log_line(line: str) -> RefusedQuery | None:
    """A refusal from the generated Corefile's ``CT_DENIAL`` log lines, or None."""
    m = _COREDNS.search(line)
    if not m or m["rcode"] != "NXDOMAIN":
        return None
    name = _clean(m["name"])
    if name is None:
        return None
    zone = m["zone"].rstrip(".")
    kind = m["kind"]
    refused = (
        kind == "all"
        or (kind == "exact" and name != zone)
        or (kind == "wild" and name == zone)
    )
    client = m["remote"].strip("[]")
    return RefusedQuery(name, client, m["qtype"]) if refused else None
