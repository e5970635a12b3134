"""Real DNS queries against the local server: the health check and bulk resolution.

``check_dns`` proves the server is up and filtering: an allowlisted name gets an
answer, a name that cannot be allowlisted gets NXDOMAIN. ``resolve_all`` resolves
many names concurrently (the refresh task), each with its addresses, the smallest TTL
of its answer and, when it failed, a short reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dns.message

# dnspython (~4 MiB with the importlib.metadata its feature check pulls in, ~35 ms) is
# imported by the first query, not with this module: a daemon without the network
# steps never makes one

#: a name no allowlist entry can match (the .invalid TLD cannot be allowlisted)
DENIED_PROBE = "denied-probe.codetainer.invalid"
DEFAULT_TIMEOUT = 2.0


@dataclass(frozen=True)
class Answer:
    rcode: str  # "NOERROR", "NXDOMAIN", "SERVFAIL", … or "TIMEOUT" / "ERROR"
    addresses: tuple[str, ...] = ()
    ttl: int | None = None
    error: str | None = None


async def query(
    name: str,
    rdtype: str,
    server: str,
    port: int = 53,
    timeout: float = DEFAULT_TIMEOUT,
) -> Answer:
    """One query (UDP, TCP when truncated); never raises for DNS or network trouble."""
    import dns.exception
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdatatype

    try:
        qname = dns.name.from_text(name)
        request = dns.message.make_query(qname, rdtype)
        async with asyncio.timeout(timeout):
            response = await _exchange(request, server, port)
    except (TimeoutError, dns.exception.Timeout):
        return Answer("TIMEOUT", error=f"no answer from {server}:{port} within {timeout:g}s")
    except (dns.exception.DNSException, OSError, ValueError, EOFError) as exc:  # EOF: TCP cut
        return Answer("ERROR", error=f"{type(exc).__name__}: {exc}")
    rcode = dns.rcode.to_text(response.rcode())
    addrs: list[str] = []
    ttls: list[int] = []
    wanted = dns.rdatatype.from_text(rdtype)
    for rrset in response.answer:
        ttls.append(rrset.ttl)
        if rrset.rdtype == wanted and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            addrs.extend(rd.to_text() for rd in rrset)
    error = None if rcode == "NOERROR" else rcode
    unique = sorted(set(addrs), key=ipaddress.ip_address)
    return Answer(rcode, tuple(unique), min(ttls) if ttls else None, error)


async def _exchange(request: dns.message.Message, server: str, port: int) -> dns.message.Message:
    """UDP, then TCP when the answer is truncated (dnspython's ``udp_with_fallback``, whose
    module would also import ``ssl`` into the daemon). The UDP socket is connected, so a
    port nobody listens on yet is refused at once (ConnectionRefusedError, from the ICMP
    error) instead of waited on to the timeout: the DNS server's start probe retries
    sooner."""
    import dns.exception
    import dns.message

    wire = request.to_wire()
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((server, port))
        await loop.sock_sendall(sock, wire)
        while True:
            data = await loop.sock_recv(sock, 65535)
            try:
                response = dns.message.from_wire(data, raise_on_truncation=True)
            except dns.message.Truncated:
                break
            except dns.exception.DNSException:
                continue  # not an answer we can read: wait for the real one
            if request.is_response(response):
                return response
    reader, writer = await asyncio.open_connection(server, port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return dns.message.from_wire(await reader.readexactly(length))
    finally:
        writer.close()


@dataclass(frozen=True)
class HealthResult:
    allowed_name: str
    #: the allowlisted name got NOERROR (with or without addresses)
    answered: bool
    allowed_rcode: str
    addresses: tuple[str, ...]
    denied_name: str
    #: the denied probe got NXDOMAIN (the filter is in place)
    nxdomain: bool
    denied_rcode: str
    #: seconds for both queries (they run concurrently)
    latency: float

    @property
    def ok(self) -> bool:
        return self.answered and self.nxdomain

    @property
    def reason(self) -> str:
        """One line for the boot step / status."""
        if self.ok:
            return f"{self.allowed_name} answered, {self.denied_name} refused"
        parts = []
        if not self.answered:
            parts.append(f"{self.allowed_name}: {self.allowed_rcode} (expected an answer)")
        if not self.nxdomain:
            parts.append(f"{self.denied_name}: {self.denied_rcode} (expected NXDOMAIN)")
        return "; ".join(parts)


async def check_dns(
    server: str,
    port: int = 53,
    allowed_name: str = "api.anthropic.com",
    denied_name: str = DENIED_PROBE,
    timeout: float = DEFAULT_TIMEOUT,
) -> HealthResult:
    start = time.monotonic()
    allowed, denied = await asyncio.gather(
        query(allowed_name, "A", server, port, timeout),
        query(denied_name, "A", server, port, timeout),
    )
    return HealthResult(
        allowed_name=allowed_name,
        answered=allowed.rcode == "NOERROR",
        allowed_rcode=allowed.rcode if allowed.rcode != "ERROR" else str(allowed.error),
        addresses=allowed.addresses,
        denied_name=denied_name,
        nxdomain=denied.rcode == "NXDOMAIN",
        denied_rcode=denied.rcode if denied.rcode != "ERROR" else str(denied.error),
        latency=time.monotonic() - start,
    )


@dataclass(frozen=True)
class Resolution:
    name: str
    addresses: tuple[str, ...]
    #: smallest TTL among the answers (None when nothing was answered)
    ttl: int | None
    #: None on success (even with no addresses), else "NXDOMAIN", "TIMEOUT", …
    error: str | None


async def resolve_all(
    names: Iterable[str],
    server: str,
    port: int = 53,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    ipv6: bool = False,
    concurrency: int = 64,
) -> dict[str, Resolution]:
    """Resolve every name (A, and AAAA when ``ipv6``) concurrently, at most
    ``concurrency`` queries in flight."""
    limit = asyncio.Semaphore(concurrency)

    async def one(name: str, rdtype: str) -> Answer:
        async with limit:
            return await query(name, rdtype, server, port, timeout)

    async def resolve(name: str) -> Resolution:
        answers = await asyncio.gather(
            *(one(name, t) for t in (("A", "AAAA") if ipv6 else ("A",)))
        )
        addrs = tuple(a for ans in answers for a in ans.addresses)
        ttls = [ans.ttl for ans in answers if ans.ttl is not None]
        errors = [ans.error for ans in answers if ans.error]
        # AAAA failing while A worked still leaves the name usable
        error = errors[0] if errors and (not addrs or len(errors) == len(answers)) else None
        return Resolution(name, addrs, min(ttls) if ttls else None, error)

    unique = list(dict.fromkeys(names))
    results = await asyncio.gather(*(resolve(n) for n in unique))
    return {r.name: r for r in results}
