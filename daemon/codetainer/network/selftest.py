"""The ``network-selftest`` boot step: the firewall and the DNS server, tried from the
agent's own uid before any agent code runs.

An allowlisted target must connect (with the policy proxy on, through the redirect to
its transparent port), a denied address must be refused fast, and direct DNS to the
upstreams must be blocked; anything else fails the boot (the agent stays stopped).
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import TYPE_CHECKING

from codetainer.boot.engine import StepError
from codetainer.network import dnscheck
from codetainer.network.compose import NetOptions, NetworkPlan, agent_identity
from codetainer.network.firewall import FirewallError, Runner, SelfTestResult, self_test

if TYPE_CHECKING:
    from codetainer.settings import Settings


async def run(settings: Settings, opts: NetOptions, plan: NetworkPlan
              ) -> tuple[SelfTestResult, str]:
    """The result (kept for readiness) and the step's one line; ``StepError`` on failure."""
    uid, gid, who = agent_identity(settings.agent_user)
    if uid == opts.dns_uid:
        raise StepError(f"the agent ({who}) has the DNS server's uid: it could reach the upstreams",
                        "set CODETAINER_DNS_USER to a dedicated user")
    allowed = await probe_target(settings, plan, opts.listen)
    denied = hostport(settings.probe_denied, "CODETAINER_PROBE_DENIED")
    try:
        result = await self_test(uid, gid, allowed, denied, [str(u.ip) for u in opts.upstreams],
                                 timeout=5.0, runner=Runner(timeout=40.0),
                                 redirect_port=opts.proxy_port)
    except (FirewallError, ValueError) as exc:
        raise StepError(f"the self-test could not run: {exc}") from None
    problems = result.problems()
    if problems:
        raise StepError("; ".join(problems), "the network is not isolated as configured; "
                        "the agent stays stopped (see `codetainer why ADDRESS`)")
    via = f" via the proxy's port {opts.proxy_port}" if result.redirected else ""
    return result, (f"{who}: {allowed[0]}:{allowed[1]} connected{via} "
                    f"({result.allowed_ms:.0f} ms), {denied[0]}:{denied[1]} refused "
                    f"({result.denied_ms:.1f} ms), direct DNS to {len(result.dns)} "
                    "upstream(s) blocked")


async def probe_target(settings: Settings, plan: NetworkPlan, listen: str) -> tuple[str, int]:
    """``CODETAINER_PROBE_ALLOWED``, else the first exact name of the allowlist, resolved
    through the local DNS server."""
    raw = settings.probe_allowed.strip()
    if raw:
        host, port = hostport(raw, "CODETAINER_PROBE_ALLOWED")
    elif plan.allowlist.names:
        host = plan.allowlist.names[0]
        ports = plan.names[host]
        port = 443 if 443 in ports else ports[0]
    else:
        raise StepError("no exact name in the allowlist to probe",
                        "set CODETAINER_PROBE_ALLOWED=host:port (an allowlisted target)")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host)), port
    answer = await dnscheck.query(host, "A", listen, 53, timeout=2.0)
    if not answer.addresses:
        raise StepError(f"self-test target {host} does not resolve through the local DNS "
                        f"server ({answer.error or answer.rcode})",
                        "set CODETAINER_PROBE_ALLOWED to an allowlisted, reachable host:port")
    return answer.addresses[0], port


def hostport(raw: str, var: str) -> tuple[str, int]:
    host, sep, port = raw.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StepError(f"{var}={raw[:60]!r} is not host:port", f"set {var}=host:443")
    return host, int(port)
