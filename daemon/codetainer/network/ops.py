"""Control operations of the network: ``why`` (open) and ``allow`` (root), and the
temporary grants ``allow`` creates.

A grant is an allowlist entry with an expiry. Granting re-plans the network with it
(DNS config regenerated, the dns service restarted when its config changed, firewall
re-applied in one transaction, the new name resolved at once) and logs the audit event
``network_allow_granted``. At expiry the same happens without it, and its addresses are
taken out of the dynamic sets too (``network_allow_expired``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from codetainer.control import protocol
from codetainer.control.server import Request, RequestError
from codetainer.network import dnscheck
from codetainer.network.active import ActiveNetwork, Grant
from codetainer.network.allowlist import Entry, EntryKind, parse_entry, validate_hostname
from codetainer.network.why import WhyAddress, WhyReport, denied_rows, parse_duration
from codetainer.proxy.model import METHOD

if TYPE_CHECKING:
    from codetainer.proxy.model import ProxyPolicy
    from codetainer.status import GrantStatus, ProxyRefusal, WhyReply

log = structlog.get_logger("codetainer.network")

GRANT_SOURCE = "codetainer allow"


class NetworkOps:
    def __init__(self, net: ActiveNetwork) -> None:
        self.net = net
        #: set by the proxy when it runs: the policy it enforces now, and its refusals
        self.proxy_policy: Callable[[], ProxyPolicy | None] | None = None
        self.proxy_refused: Callable[[], list[ProxyRefusal]] | None = None
        self.grants: dict[str, Grant] = {}
        self.changed = asyncio.Event()

    def active(self) -> list[Entry]:
        """Entries of the grants that have not expired."""
        now = time.monotonic()
        return [g.entry for g in self.grants.values() if g.expires_mono > now]

    async def expire(self) -> None:
        """Forever: at each grant's expiry, re-plan without it, then drop it."""
        while True:
            now = time.monotonic()
            expired = [k for k, g in self.grants.items() if g.expires_mono <= now]
            if expired:
                # The plan leaves expired grants out; they leave status once revoked.
                try:
                    await self.net.rebuild("grant expired")
                except Exception:
                    log.exception("network_grant_expiry_failed")
            for key in expired:
                grant = self.grants.pop(key)
                log.info("network_allow_expired", target=key, by_uid=grant.by_uid)
            nxt = min((g.expires_mono for g in self.grants.values()), default=None)
            self.changed.clear()
            wait = 3600.0 if nxt is None else max(0.0, nxt - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), wait)

    async def op_allow(self, req: Request) -> dict[str, Any]:
        target = req.args.get("target")
        if not isinstance(target, str) or not target.strip():
            raise RequestError(protocol.BAD_REQUEST, "allow needs args.target (a host name)")
        try:
            seconds = parse_duration(str(req.args.get("duration") or "1h"))
            entry = parse_entry(target.strip(), GRANT_SOURCE, 0)
        except ValueError as exc:
            raise RequestError(protocol.BAD_REQUEST, f"{target[:80]!r}: {exc}") from None
        if entry.kind is EntryKind.GITHUB:
            raise RequestError(protocol.BAD_REQUEST, "@github cannot be granted temporarily: "
                               "add it to domains.conf")
        if self.net.refresher is None:
            raise RequestError(protocol.FAILED, "the network is not set up (boot did not reach "
                               "the firewall step): nothing to grant into")
        key = str(entry)
        grant = Grant(entry, time.time() + seconds, time.monotonic() + seconds, req.peer.uid)
        self.grants[key] = grant
        log.info("network_allow_granted", target=key, kind=entry.kind.value, duration_s=seconds,
                 expires_at=grant.expires_at, by_uid=req.peer.uid, by_pid=req.peer.pid)
        self.changed.set()
        result = await self.net.rebuild("grant")
        # data only: the CLI says it (cli/render.py render_allow)
        return {**result, "grant": grant.as_dict(), "duration_s": seconds}

    async def op_why(self, req: Request) -> WhyReply:
        target = req.args.get("target")
        if not isinstance(target, str) or not target.strip() or len(target) > 2048:
            raise RequestError(protocol.BAD_REQUEST,
                               "why needs args.target: a host name, an IP or a URL")
        if self.net.net is None:
            raise RequestError(protocol.FAILED, "the network is not set up (network-config did not run)")
        target = target.strip()
        url = parse_url(target) if "://" in target else None
        if url is not None:
            target = url.host
        elif len(target) > 260:
            raise RequestError(protocol.BAD_REQUEST, "why: a host name or an IP is at most 260 characters")
        report = await self._why_target(target)
        if url is not None:
            method = req.args.get("method")
            methods = [method] if isinstance(method, str) and method else ["GET", "POST"]
            if not all(METHOD.match(m) for m in methods):
                raise RequestError(protocol.BAD_REQUEST, f"why: {methods[0][:20]!r} is not an HTTP method")
            self._why_requests(report, url, methods)
        return report.as_dict()

    def _why_requests(self, report: WhyReport, url: Url, methods: list[str]) -> None:
        """The proxy's verdict on ``url`` per method, by the policy the proxy runs now."""
        policy = self.proxy_policy() if self.proxy_policy is not None else None
        if policy is None:
            report.notes.append("the policy proxy is off (CODETAINER_PROXY=off): the firewall "
                                "decides by address and port only")
            return
        from codetainer.proxy.model import HttpRequest
        from codetainer.proxy.policy import decide

        now = time.time()
        for m in methods:
            host = url.host
            d = decide(policy, HttpRequest(method=m, host=host, path=url.path, port=url.port,
                                           scheme=url.scheme, sni=host if url.scheme == "https" else None),
                       now)
            report.requests.append({"method": m, "url": url.text, "allowed": d.allowed,
                                    "where": d.where, "rule": d.rule, "reason": d.reason,
                                    "credential": bool(d.credential)})
        if self.proxy_refused is not None:
            report.proxy_refused = [r for r in self.proxy_refused() if r.get("host") == url.host]

    async def _why_target(self, target: str) -> WhyReport:
        net = self.net
        setup = net.net
        if setup is None:
            raise RequestError(protocol.FAILED, "the network is not set up (network-config did not run)")
        allow = net.effective()
        report: WhyReport
        addrs: list[str]
        try:
            ip = ipaddress.ip_address(target)
        except ValueError:
            try:
                host = validate_hostname(target)
            except ValueError as exc:
                raise RequestError(protocol.BAD_REQUEST, f"{target[:80]!r}: {exc}") from None
            entry = allow.match(host)
            report = WhyReport(host, "host", str(entry) if entry else None, where(entry))
            types = ("A", "AAAA") if setup.opts.ipv6 == "allowlist" else ("A",)
            answers = [await dnscheck.query(host, t, setup.opts.listen, 53, timeout=2.0) for t in types]
            addrs = sorted({a for ans in answers for a in ans.addresses})
            report.rcode = answers[0].rcode
            report.refused = net.refused.get(host)
            report.grant = self._grant_for(entry)
        else:
            nets = setup.github.networks if setup.github else ()
            entry = allow.match_ip(ip, nets)
            report = WhyReport(str(ip), "ip", str(entry) if entry else None, where(entry))
            addrs = [str(ip)]
        denied = await net.read_denied()
        for a in addrs:
            names = net.refresher.names_for(a) if net.refresher else []
            last = net.addr_names.get(a)
            if last and last[0] not in names:
                names.append(last[0])
            sets = await setup.backend.contains(a)
            report.addresses.append(WhyAddress(a, sets, denied_rows(denied, a), names))
            if ":" in a and setup.opts.ipv6 == "deny":
                report.notes.append("IPv6 egress is denied (CODETAINER_IPV6=deny)")
        if entry is not None and report.kind == "host":
            report.notes.append(f"allowed ports: {', '.join(map(str, allow.ports_for(entry)))}")
        return report

    def _grant_for(self, entry: Any) -> GrantStatus | None:
        if entry is None or entry.source != GRANT_SOURCE:
            return None
        grant = self.grants.get(str(entry))
        return grant.as_dict() if grant else None


@dataclass(frozen=True)
class Url:
    text: str
    scheme: str
    host: str
    port: int
    path: str


def parse_url(text: str) -> Url:
    """``https://host[:port]/path?q`` for ``why``; ``RequestError`` says what is wrong."""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
        host = validate_hostname(parts.hostname or "") if not _is_ip(parts.hostname) \
            else str(parts.hostname)
    except ValueError as exc:
        raise RequestError(protocol.BAD_REQUEST, f"why: {text[:80]!r} is not a URL I can "
                           f"decide: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise RequestError(protocol.BAD_REQUEST, "why: the URL must be http:// or https://")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Url(text[:300], parts.scheme, host,
               port or (443 if parts.scheme == "https" else 80), path)


def _is_ip(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


def where(entry: Any) -> str | None:
    if entry is None:
        return None
    if entry.source == GRANT_SOURCE:
        return "temporary grant (codetainer allow)"
    return str(entry.where)
