"""The request policy of the proxy: ``decide(policy, request, now) -> Decision``, pure.

Order of the checks, each refusing with its own reason:

1. Host agreement. The TLS server name and the ``Host`` header must name the same host,
   and so must the ``CONNECT`` target: a client that says ``api.github.com`` in TLS and
   ``evil.example`` in HTTP is reaching the second through a CDN address the first
   shares (issue 13, channel 2).
2. The entries matching the host. A name is matched against the name entries only
   (exact, or ``*.d`` for any strict subdomain of ``d``): a name that is not listed is
   refused even when its address lies in a CIDR entry or GitHub's ranges, since that
   address is shared. A bare address (no SNI, ``Host`` is an IP) is matched against the
   CIDR entries and, when ``@github`` is listed, GitHub's ranges. Expired temporary
   grants are ignored.
3. The port must be one of the entry's ports.
4. The entry's rules: no rules allow everything (an entry opened on purpose);
   ``methods``/``paths`` must all pass, then the preset (:mod:`codetainer.proxy.presets`).

Any matching entry that allows the request allows it; the decision names that entry.
A refusal names the most specific matching entry (an exact name before wildcards, a
longer wildcard before a shorter one, the narrowest network first, ``@github`` last).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, replace

from codetainer.network.model import IPAddress, IPNetwork
from codetainer.proxy.model import (
    CREDENTIAL_NONE,
    Decision,
    HttpRequest,
    PolicyEntry,
    ProxyPolicy,
)
from codetainer.proxy.presets import PRESET_FUNCS, Verdict, canonical_path, split_path

HOW_TO_ALLOW = "add it to network/domains.conf, or `codetainer allow {host}` for a while"


@dataclass(frozen=True)
class CompiledPolicy:
    """A :class:`ProxyPolicy` indexed for per-request lookups."""

    policy: ProxyPolicy
    exact: dict[str, tuple[PolicyEntry, ...]]
    #: ``githubusercontent.com`` -> the ``*.githubusercontent.com`` entries
    wild: dict[str, tuple[PolicyEntry, ...]]
    #: network entries, narrowest first
    nets: tuple[tuple[IPNetwork, PolicyEntry], ...]
    github_nets: tuple[IPNetwork, ...]
    github_entries: tuple[PolicyEntry, ...]


def compile_policy(policy: ProxyPolicy) -> CompiledPolicy:
    exact: dict[str, list[PolicyEntry]] = {}
    wild: dict[str, list[PolicyEntry]] = {}
    nets: list[tuple[IPNetwork, PolicyEntry]] = []
    for e in policy.entries:
        if e.kind == "host":
            exact.setdefault(e.value, []).append(e)
        elif e.kind == "wildcard":
            wild.setdefault(e.value[2:], []).append(e)
        elif e.kind == "cidr":
            try:
                nets.append((ipaddress.ip_network(e.value), e))
            except ValueError:
                continue  # a policy file is validated on read; never allow more on a bad line
    nets.sort(key=lambda ne: -ne[0].prefixlen)  # stable: file order among equals
    github_nets: list[IPNetwork] = []
    for text in policy.github_ranges:
        try:
            github_nets.append(ipaddress.ip_network(text))
        except ValueError:
            continue
    return CompiledPolicy(
        policy,
        {k: tuple(v) for k, v in exact.items()},
        {k: tuple(v) for k, v in wild.items()},
        tuple(nets),
        tuple(github_nets),
        tuple(e for e in policy.entries if e.kind == "github"),
    )


_last: tuple[ProxyPolicy, CompiledPolicy] | None = None


def compiled(policy: ProxyPolicy | CompiledPolicy) -> CompiledPolicy:
    """The compiled form, cached for the last policy seen (the proxy holds one at a time:
    a reload brings a new object, compiled once on its first request)."""
    global _last
    if isinstance(policy, CompiledPolicy):
        return policy
    last = _last
    if last is not None and last[0] is policy:
        return last[1]
    cp = compile_policy(policy)
    _last = (policy, cp)
    return cp


def normal_host(text: str | None) -> str:
    """Lower case, no trailing dot, no IPv6 brackets; ``""`` for None."""
    if not text:
        return ""
    host = text.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def as_ip(host: str) -> IPAddress | None:
    """The address ``host`` spells, an IPv4-mapped IPv6 one as IPv4 (a dual-stack socket
    reports ``::ffff:203.0.113.5`` for 203.0.113.5); None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped if mapped is not None else ip


def match_entries(
    policy: ProxyPolicy | CompiledPolicy, host_or_ip: str, now: float | None = None
) -> list[PolicyEntry]:
    """The entries (not expired at ``now``, default: the clock) that match a host name
    or a bare address, most specific first."""
    cp = compiled(policy)
    when = time.time() if now is None else now
    host = normal_host(host_or_ip)
    ip = as_ip(host)
    found: list[PolicyEntry] = []
    if ip is not None:
        found.extend(e for net, e in cp.nets if ip.version == net.version and ip in net)
        if cp.github_entries and any(ip.version == n.version and ip in n for n in cp.github_nets):
            found.extend(cp.github_entries)
    elif host:
        found.extend(cp.exact.get(host, ()))
        labels = host.split(".")
        for i in range(1, len(labels) - 1):  # longest domain first; never the TLD alone
            found.extend(cp.wild.get(".".join(labels[i:]), ()))
    return [e for e in found if e.expires is None or e.expires > when]


def refuse(why: str, where: str = "", rule: str = "") -> Decision:
    return Decision(False, where, rule, why)


def decide(policy: ProxyPolicy | CompiledPolicy, req: HttpRequest, now: float) -> Decision:
    """Allowed or refused, with the entry and rule that decided and a reason for a
    person; an allowed request carries the credential its preset gives it."""
    cp = compiled(policy)
    host = normal_host(req.host)
    if not host:
        return refuse("the request names no host (no Host header): refused")
    sni = normal_host(req.sni) if req.sni else None
    if sni is not None and sni != host:
        return refuse(f"SNI {sni} and Host {host} differ: one connection may reach one host",
                      rule="SNI = Host")
    if req.connect_host is not None:
        target = normal_host(req.connect_host)
        if target != host:
            return refuse(f"CONNECT {target} and Host {host} differ: one tunnel may reach "
                          f"one host", rule="CONNECT = Host")
    ip = as_ip(host)
    if ip is not None and req.dst_ip is not None:
        dst = as_ip(normal_host(req.dst_ip))
        if dst != ip:
            return refuse(f"connected to {req.dst_ip} but Host names {host}", rule="address = Host")
    entries = match_entries(cp, host, now)
    if not entries:
        what = "no network entry covers" if ip is not None else "is not in the allowlist"
        why = f"{what} {host}" if ip is not None else f"{host} {what}"
        return refuse(f"{why}: {HOW_TO_ALLOW.format(host=host)}", rule="not allowlisted")
    if host != req.host:
        req = replace(req, host=host)
    fitting = [e for e in entries if req.port in e.ports]
    if not fitting:
        e = entries[0]
        return refuse(f"port {req.port} is not allowed for {host}: {e.value} ({e.where}) "
                      f"allows {','.join(map(str, e.ports))}",
                      where=e.where, rule=f"ports {','.join(map(str, e.ports))}")
    decisions = [_evaluate(e, req, cp) for e in fitting]
    allowed = [d for d in decisions if d.allowed]
    if allowed:
        # an entry whose preset gives the request a credential decided it is that
        # service's own request: prefer it over an entry that merely lets it pass
        return next((d for d in allowed if d.credential != CREDENTIAL_NONE), allowed[0])
    return decisions[0]


def _evaluate(e: PolicyEntry, req: HttpRequest, cp: CompiledPolicy) -> Decision:
    rules = e.rules
    if rules is None:
        return Decision(True, e.where, "no rules", f"{e.value} ({e.where}) allows every "
                        f"method and path")
    if not canonical_path(req.path):
        return Decision(False, e.where, "canonical path",
                        f"the path {split_path(req.path)[0][:80]!r} has a '.' or '..' segment "
                        f"or a backslash: a server may read it as another path")
    if rules.methods is not None and req.method not in rules.methods:
        return Decision(False, e.where, f"methods={','.join(rules.methods)}",
                        f"{e.value} ({e.where}) allows {','.join(rules.methods)} only: "
                        f"{req.method} is refused")
    path = split_path(req.path)[0]
    if rules.paths is not None and not path.startswith(rules.paths):
        return Decision(False, e.where, f"paths={','.join(rules.paths)}",
                        f"{e.value} ({e.where}) allows paths under {','.join(rules.paths)} "
                        f"only: {path[:80]} is refused")
    if rules.preset is None:
        return Decision(True, e.where, str(rules), f"{req.method} {path[:80]} passes {rules}")
    fn = PRESET_FUNCS.get(rules.preset)
    verdict = fn(req, cp.policy) if fn is not None else Verdict(
        False, f"preset={rules.preset}", f"unknown preset {rules.preset!r}")
    if verdict.allowed and verdict.credential != CREDENTIAL_NONE and req.scheme != "https":
        # the proxy would put the operator's token on a plain-text connection
        return Decision(False, e.where, f"{verdict.rule}, https only",
                        f"{req.host} gets the operator's credential over HTTPS only: "
                        f"use https://{req.host}{split_path(req.path)[0][:60]}")
    return Decision(verdict.allowed, e.where, verdict.rule, verdict.reason,
                    verdict.credential if verdict.allowed else CREDENTIAL_NONE)
