"""From settings and an allowlist to what the network parts run: the DNS server's config
and exec script, the names the refresh task resolves, the port groups and the firewall
policy. Pure functions and values (no I/O but the user database), so the controller's
steps, reload and temporary grants all build the same things the same way.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from codetainer.network.allowlist import Allowlist, EntryKind
from codetainer.network.dnsconfig import (
    COREDNS_BIN,
    DEFAULT_HOOK,
    DnsOptions,
    Engine,
    GeneratedConfig,
    SetBackend,
    Upstream,
    exec_script,
    parse_upstream,
    parse_upstreams,
    render_corefile,
    render_dnsmasq,
)
from codetainer.network.dnsplan import DnsPlan
from codetainer.network.firewall import (
    INBOUND_FORM,
    DnsLimit,
    FirewallPolicy,
    InboundPort,
    parse_inbound,
)
from codetainer.network.firewall_policy import dns_name_bound, parse_dns_rate
from codetainer.network.flyenv import FlyEvidence, choose_ipv6, parse_ipv6_setting
from codetainer.network.model import IPNetwork, Ports
from codetainer.proxy.model import TRANSPARENT_PORT
from codetainer.settings import SettingsError

if TYPE_CHECKING:
    from codetainer.settings import Settings

#: fallback uid of the agent when its user does not exist (the image's ``claude``)
AGENT_UID = 1000


@dataclass(frozen=True)
class NetOptions:
    """The network settings, parsed and checked once (``ValueError`` names the variable)."""

    engine: Engine
    listen: str
    upstreams: tuple[Upstream, ...]
    ipv6: str
    min_ttl: float
    max_ttl: float
    grace: float
    dns_user: str
    dns_uid: int
    dns_gid: int
    dns_group: str | None
    #: ``host:port`` of the forwarding hook, or None (dnsmasq fills the sets itself)
    hook: str | None
    run_dir: Path
    #: published ports that accept inbound connections (``CODETAINER_INBOUND``)
    inbound: tuple[InboundPort, ...] = ()
    #: why ``ipv6`` is what it is (``auto``'s evidence, or the setting)
    ipv6_why: str = ""
    #: the agent's uid (the firewall's rules for the agent: the proxy, the DNS limit)
    agent_uid: int | None = None
    #: the policy proxy's uid (proxy on): under the agent's DNS limit too
    proxy_uid: int | None = None
    #: the policy proxy's transparent port (``CODETAINER_PROXY=on``), else None
    proxy_port: int | None = None
    #: (rate, burst) of the agent's queries to the local DNS server
    #: (``CODETAINER_DNS_LIMIT``), None: unlimited
    dns_rate: tuple[int, int] | None = None

    @property
    def exec_path(self) -> Path:
        """What ``[program:dns] command=`` runs (``/run/codetainer/dns/exec``)."""
        return self.run_dir / "dns" / "exec"

    @property
    def config_path(self) -> Path:
        name = "Corefile" if self.engine is Engine.COREDNS else "dnsmasq.conf"
        return self.run_dir / "dns" / name

    @property
    def max_cache_ttl(self) -> int:
        return max(1, min(86400, round(self.max_ttl)))


def parse_options(settings: Settings, engine: Engine, fly: FlyEvidence | None = None) -> NetOptions:
    """``fly``: what :func:`flyenv.read_evidence` found, for ``CODETAINER_IPV6=auto``."""
    upstreams = parse_upstreams(settings.upstreams)
    ipv6 = choose_ipv6(parse_ipv6_setting(settings.ipv6), fly)
    # ranges checked when the settings were parsed (0 < floor <= ceiling <= 300, grace >= 0)
    min_ttl, max_ttl, grace = settings.refresh_min_ttl, settings.refresh_max_ttl, settings.refresh_grace
    try:
        inbound = parse_inbound(settings.inbound)
    except ValueError as exc:
        raise ValueError(f"CODETAINER_INBOUND={settings.inbound[:80]!r}: {exc}; use {INBOUND_FORM}") from None
    ipaddress.ip_address(settings.dns_listen)
    try:
        dns_rate = parse_dns_rate(settings.dns_limit)
    except ValueError as exc:
        raise ValueError(f"CODETAINER_DNS_LIMIT: {exc}") from None
    try:
        pw = pwd.getpwnam(settings.dns_user)
    except KeyError:
        raise ValueError(
            f"DNS user {settings.dns_user[:40]!r} does not exist: create it in the image "
            "or set CODETAINER_DNS_USER to an existing unprivileged user"
        ) from None
    if pw.pw_uid == 0:
        raise ValueError("CODETAINER_DNS_USER must not be root: only the DNS server may reach upstreams")
    try:
        group: str | None = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = None
    hook_setting = settings.dns_hook.strip().lower()
    if hook_setting in ("off", "0", "none"):
        hook = None
    elif hook_setting:
        hook = hook_setting
    else:
        hook = DEFAULT_HOOK if engine is Engine.COREDNS else None
    if hook is not None:
        parse_upstream(hook)
    if engine is Engine.COREDNS and shutil.which(COREDNS_BIN) is None:
        raise ValueError(
            "CODETAINER_DNS_ENGINE picks CoreDNS but no `coredns` is on PATH: install it "
            "(the image has /usr/local/bin/coredns; ./dev setup builds it) or set "
            "CODETAINER_DNS_ENGINE=dnsmasq"
        )
    return NetOptions(
        engine=engine, listen=settings.dns_listen, upstreams=upstreams, ipv6=ipv6.policy,
        min_ttl=min_ttl, max_ttl=max_ttl, grace=grace, dns_user=settings.dns_user,
        dns_uid=pw.pw_uid, dns_gid=pw.pw_gid, dns_group=group, hook=hook,
        run_dir=Path(settings.run_dir), inbound=inbound, ipv6_why=ipv6.why,
        agent_uid=agent_identity(settings.agent_user)[0],
        proxy_port=TRANSPARENT_PORT if settings.proxy else None, dns_rate=dns_rate,
        proxy_uid=_proxy_uid(settings) if settings.proxy else None,
    )


def check_settings(settings: Settings) -> None:
    """The network's text settings (their parsers live here), parsed at start so a bad one
    exits 64 like every other setting: :class:`SettingsError` naming it."""
    hook = settings.dns_hook.strip().lower()
    checks: tuple[tuple[str, Callable[[str], object], str], ...] = (
        ("upstreams", parse_upstreams, "use IP addresses, comma-separated (8.8.8.8,1.1.1.1)"),
        ("inbound", parse_inbound, f"use {INBOUND_FORM}"),
        ("dns_listen", ipaddress.ip_address, "use an IP address (127.0.0.53)"),
        ("dns_limit", parse_dns_rate, "use RATE/BURST (50/5000) or off"),
        ("dns_hook", (lambda _: None) if hook in ("", "off", "0", "none") else parse_upstream,
         "use ip:port (127.0.0.1:5354), off, or leave it empty"),
    )
    for name, parse, accepted in checks:
        raw = getattr(settings, name)
        try:
            parse(raw)
        except ValueError as exc:
            raise SettingsError(name, raw, f"{exc}; {accepted}") from None


def _proxy_uid(settings: Settings) -> int | None:
    """The proxy user's uid (None when it does not exist: the proxy step says so)."""
    try:
        uid = pwd.getpwnam(settings.proxy_user).pw_uid
    except KeyError:
        return None
    return uid or None


def agent_identity(name: str) -> tuple[int, int, str]:
    """(uid, gid, note) of the agent user; uid 1000 when the user does not exist."""
    if name.isdigit():
        return int(name), int(name), f"uid {name}"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return AGENT_UID, AGENT_UID, f"user {name!r} does not exist, probing as uid {AGENT_UID}"
    return pw.pw_uid, pw.pw_gid, f"user {name} (uid {pw.pw_uid})"


@dataclass(frozen=True)
class NetworkPlan:
    """One allowlist, planned: the data every network part is rendered from."""

    allowlist: Allowlist
    #: domain -> what is answered there and the dynamic sets (ports) its answers fill
    dns: DnsPlan
    #: the DNS server's config, rendered from ``dns`` for the engine in use
    config: GeneratedConfig
    #: exact names the refresh task resolves -> their static group's ports
    names: dict[str, Ports]
    #: CIDR entries and ``@github`` ranges, per port group
    fixed: dict[Ports, tuple[str, ...]]
    #: every port group of the policy (each gets its static and dynamic sets)
    groups: tuple[Ports, ...]

    @property
    def domain_sets(self) -> dict[str, tuple[str, ...]]:
        """domain -> dynamic set names: the hook's routing (dnsmasq ``nftset=`` semantics)."""
        return self.dns.domain_sets


def render_config(dns: DnsPlan, opts: NetOptions, backend: str) -> GeneratedConfig:
    """The DNS server's config for the engine and the firewall backend in use."""
    dns_opts = DnsOptions(
        listen=opts.listen, port=53, upstreams=opts.upstreams, ipv6=dns.ipv6,
        max_ttl=opts.max_cache_ttl, user=opts.dns_user, group=opts.dns_group,
    )
    if opts.engine is Engine.COREDNS:
        return render_corefile(dns, dataclasses.replace(dns_opts, hook=opts.hook))
    if opts.hook is not None:
        # dnsmasq standing where CoreDNS would: it forwards to the hook and fills nothing.
        hooked = dataclasses.replace(dns_opts, upstreams=(parse_upstream(opts.hook),))
        return render_dnsmasq(dns, hooked, None)
    return render_dnsmasq(dns, dns_opts, SetBackend.NFTSET if backend == "nftables" else SetBackend.IPSET)


def make_plan(
    allowlist: Allowlist,
    opts: NetOptions,
    backend: str,
    github: Sequence[IPNetwork] = (),
) -> NetworkPlan:
    dns = DnsPlan.build(allowlist, ipv6=opts.ipv6 == "allowlist")
    names: dict[str, Ports] = {}
    for name in allowlist.names:
        ports = dns.ports_of(name)
        if ports is None:  # an exact name always has its own domain; keep its entry's ports
            entry = allowlist.match(name)
            ports = allowlist.ports_for(entry) if entry else (80, 443)
        names[name] = ports
    fixed: dict[Ports, list[str]] = {}
    for e in allowlist.entries:
        if e.kind is EntryKind.CIDR:
            fixed.setdefault(allowlist.ports_for(e), []).append(str(e.network))
        elif e.kind is EntryKind.GITHUB and github:
            fixed.setdefault(allowlist.ports_for(e), []).extend(str(n) for n in github)
    groups = {s.ports for s in dns.dynamic_sets} | set(names.values()) | set(fixed)
    return NetworkPlan(
        allowlist=allowlist, dns=dns, config=render_config(dns, opts, backend), names=names,
        fixed={p: tuple(dict.fromkeys(a)) for p, a in fixed.items()},
        groups=tuple(sorted(groups)),
    )


def build_policy(
    plan: NetworkPlan, contents: Mapping[Ports, Iterable[str]], opts: NetOptions
) -> FirewallPolicy:
    """The firewall policy: every group of the plan, static sets filled from ``contents``."""
    groups: dict[Ports, list[str]] = {p: list(plan.fixed.get(p, ())) for p in plan.groups}
    for ports, addrs in contents.items():
        groups.setdefault(ports, []).extend(addrs)
    hook = parse_upstream(opts.hook) if opts.hook else None
    limit = None
    if opts.dns_rate is not None and opts.agent_uid is not None:
        # An allowlisted name longer than the default bound raises it: never cut a name
        # the operator allowed.
        limit = DnsLimit(ipaddress.ip_address(opts.listen), *opts.dns_rate,
                         max_name=dns_name_bound(plan.allowlist.names),
                         also_uids=(opts.proxy_uid,) if opts.proxy_uid is not None else ())
    return FirewallPolicy.build(
        groups, dns_uid=opts.dns_uid, upstreams=[u.ip for u in opts.upstreams],
        ipv6=opts.ipv6, dynamic_timeout=plan.config.set_timeout, inbound=opts.inbound,
        dns_hook=(hook.ip, hook.port) if hook else None, agent_uid=opts.agent_uid,
        proxy_port=opts.proxy_port if opts.agent_uid is not None else None, dns_limit=limit,
    )


def dns_exec_script(opts: NetOptions) -> str:
    """The supervised service's command. dnsmasq starts as root (to bind port 53 and keep
    CAP_NET_ADMIN for the sets) and drops to the DNS user itself (``user=``); CoreDNS is
    started as the DNS user with only the capability to bind port 53."""
    if opts.engine is Engine.DNSMASQ:
        return exec_script(Engine.DNSMASQ, str(opts.config_path))
    coredns = shutil.which(COREDNS_BIN) or COREDNS_BIN
    return (
        "#!/bin/sh\n"
        f"exec setpriv --reuid={opts.dns_uid} --regid={opts.dns_gid} --clear-groups "
        "--inh-caps=+net_bind_service --ambient-caps=+net_bind_service "
        f"{shlex.quote(coredns)} -conf {shlex.quote(str(opts.config_path))}\n"
    )


def write_atomic(path: Path, text: str, mode: int = 0o644) -> bool:
    """Replace ``path`` (temporary file + rename); False when the content was the same."""
    try:
        if path.read_text() == text:
            os.chmod(path, mode)
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def write_resolv_conf(path: Path, listen: str) -> None:
    """Point the resolver at the local server. A bind-mounted file (Docker's
    /etc/resolv.conf) cannot be renamed over: it is rewritten in place then."""
    text = ("# written by codetainer: the local DNS server answers allowlisted names only\n"
            f"nameserver {listen}\n")
    try:
        write_atomic(path, text)
    except OSError:
        path.write_text(text)
