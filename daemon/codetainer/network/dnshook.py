"""The zero-race forwarding hook for the CoreDNS engine.

CoreDNS has no nftset/ipset integration, so the generated Corefile forwards every
allowlisted zone to this small forwarder inside the daemon (UDP and TCP, by default on
``127.0.0.1:5354``) instead of to the upstream resolvers. For each query it:

1. refuses (NXDOMAIN) a name the allowlist does not allow: defence in depth, CoreDNS
   already only forwards allowlisted zones. Names are compared label by label
   (:func:`host_name`): a label holding a byte no allowlist entry can contain (a dot,
   NUL, ``\\``, space...) matches nothing, so the one label ``x.githubusercontent``
   followed by ``com`` is not under ``*.githubusercontent.com`` (dnsmasq 2.90 answers
   such a name REFUSED);
2. forwards the query, byte for byte, to the upstream resolvers in order;
3. refuses (NXDOMAIN) an answer any A/AAAA record of which (the whole CNAME chain)
   points into the screened networks (``model.INTERNAL`` less what an explicit CIDR
   entry opens, :func:`~codetainer.network.dnsconfig.screened_networks`), as dnsmasq's
   ``bogus-nxdomain=`` does: DNS rebinding gets no answer at all, not just no set entry;
4. adds every A/AAAA address of the answer to the dynamic set(s) of the name's domain,
   in **one** firewall transaction (shared with the answers that arrive meanwhile:
   :class:`~codetainer.network.setwriter.BatchedWriter`), applied by a persistent helper
   process rather than one ``nft``/``ipset`` run each
   (:class:`~codetainer.network.setwriter.SetHelper`), and only then
5. replies. If the insertion fails the client gets SERVFAIL (and retries; the Corefile
   does not cache SERVFAIL): an address is never handed out before it is allowed.

The sets a name's addresses go to are the ones dnsmasq's ``nftset=`` lines would use
(longest matching domain wins): both come from the same plan
(:attr:`~codetainer.network.dnsplan.DnsPlan.domain_sets`), so both engines fill exactly
the same sets. Re-adding an address refreshes its timeout: the nftables
writer deletes and re-adds it inside the same transaction (nft 1.0.6 does not refresh a
timeout on a plain ``add``), the ipset writer uses ``-exist``.

Only the DNS server's user may reach the upstream resolvers, and the daemon runs as
root. The hook's upstream sockets are therefore created with the file-system uid
switched to the DNS user (``setfsuid`` around ``socket()``, which is per thread): the
kernel records that uid as the socket owner, and the firewall's existing "DNS user to
upstream port 53" rule covers the hook with no extra rule.

Only the DNS server's user may send it a query: the firewall rejects loopback packets to
the hook's address and port from any other uid (``FirewallPolicy.dns_hook``).

Tested for real behind CoreDNS 1.12.1 (and behind dnsmasq standing in CoreDNS's
position, ``server=/name/127.0.0.1#5354`` with no ``nftset=`` lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import structlog

from codetainer.network.dnsconfig import Upstream
from codetainer.network.model import IPNetwork, is_internal
from codetainer.network.setwriter import (  # the writers lived here: still importable
    BatchedWriter,
    IpsetWriter,  # noqa: F401
    NftSetWriter,  # noqa: F401
    SetWriter,
)
from codetainer.streams import close_writer

log = structlog.get_logger("codetainer.network")

#: seconds the hook waits for one upstream. CoreDNS's ``forward`` gives the hook 2 s per
#: try (fixed in 1.12: no option) and retries until 5 s: with a dead first upstream the
#: next must still answer inside those 2 s. The upstream that answered goes first then.
UPSTREAM_TIMEOUT = 0.8
#: a query label made only of what host names are made of (allowlist._LABEL's
#: characters, compared after ASCII lower-casing), plus ``_`` as dnsmasq forwards it
#: (``_dmarc.x.example.com``, SRV names): never a dot, NUL or any other byte
_HOST_LABEL = re.compile(rb"[a-z0-9_-]{1,63}\Z")
_libc = ctypes.CDLL(None, use_errno=True)


def host_name(name: dns.name.Name) -> str | None:
    """The lower-case dotted text of a query name whose every label is letters, digits
    and ``-``; None for any other name (the root, a relative name, a label with any
    other byte).

    Joining labels with dots is unambiguous only when no label holds a dot: the text of
    ``[x.githubusercontent][com]`` would read as a subdomain of ``githubusercontent.com``.
    With every label screened, text equality is label equality, so the allowlist's
    text matcher and :class:`SetRoutes` compare labels.
    """
    if not name.is_absolute():
        return None
    labels = [label.lower() for label in name.labels[:-1]]
    if not labels or not all(_HOST_LABEL.match(label) for label in labels):
        return None
    return ".".join(label.decode("ascii") for label in labels)


class SetRoutes:
    """Which dynamic sets a name's addresses go to: the longest matching domain."""

    def __init__(self, sets: Mapping[str, Sequence[str]]) -> None:
        self.sets = {d.lower().rstrip("."): tuple(s) for d, s in sets.items()}

    def lookup(self, qname: str) -> tuple[str, ...]:
        labels = qname.lower().rstrip(".").split(".")
        for i in range(len(labels)):
            hit = self.sets.get(".".join(labels[i:]))
            if hit is not None:
                return hit
        return ()


def owned_socket(family: int, kind: int, uid: int | None) -> socket.socket:
    """A socket the kernel attributes to ``uid`` (root keeps every other privilege)."""
    if uid is None:
        return socket.socket(family, kind)
    previous = _libc.setfsuid(ctypes.c_uint(uid))
    try:
        return socket.socket(family, kind)
    finally:
        _libc.setfsuid(ctypes.c_uint(previous))


def answer_addresses(msg: dns.message.Message) -> list[str]:
    out: list[str] = []
    for rrset in msg.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.extend(rd.to_text() for rd in rrset)
    return sorted(set(out))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, hook: DnsHook) -> None:
        self.hook = hook
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.hook.spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = await self.hook.answer(data, str(addr[0]), tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsHook:
    def __init__(
        self,
        listen: str,
        upstreams: Sequence[Upstream],
        routes: SetRoutes,
        writer: SetWriter,
        *,
        allowed: Callable[[str], bool],
        sock_uid: int | None,
        timeout: float = UPSTREAM_TIMEOUT,
        on_refused: Callable[[str, str], None] | None = None,
        on_answer: Callable[[str, list[str]], None] | None = None,
        screened: Sequence[IPNetwork] = (),
    ) -> None:
        host, _, port = listen.rpartition(":")
        self.host = str(ipaddress.ip_address(host.strip("[]")))
        self.port = int(port)
        self.upstreams = tuple(upstreams)
        self.routes = routes
        self.writer = BatchedWriter(writer)
        self.allowed = allowed
        self.sock_uid = sock_uid
        self.timeout = timeout
        self.on_refused = on_refused
        self.on_answer = on_answer
        #: an answer pointing in here is NXDOMAIN (replaced with the plan on reload)
        self.screened = tuple(screened)
        self.limit = asyncio.Semaphore(256)
        self.tasks: set[asyncio.Task[None]] = set()
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.counts = {"queries": 0, "refused": 0, "internal": 0, "answered": 0, "servfail": 0,
                       "inserted": 0}

    @property
    def address(self) -> str:
        return f"{self.host}#{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(self.host, self.port)
        )
        self.udp = transport
        self.tcp = await asyncio.start_server(self._tcp_client, self.host, self.port)
        log.info("dns_hook_started", listen=f"{self.host}:{self.port}",
                 upstreams=[u.hostport for u in self.upstreams])

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
            await self.tcp.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        try:
            while True:
                async with asyncio.timeout(10.0):  # one deadline for the whole message
                    head = await reader.readexactly(2)
                    data = await reader.readexactly(struct.unpack("!H", head)[0])
                reply = await self.answer(data, client, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            await close_writer(writer)

    # -- one query -------------------------------------------------------------------

    async def answer(self, wire: bytes, client: str, *, tcp: bool) -> bytes | None:
        async with self.limit:
            return await self._answer(wire, client, tcp)

    async def _answer(self, wire: bytes, client: str, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: no reply, as a resolver would
        self.counts["queries"] += 1
        if query.flags & dns.flags.QR:
            return None
        if len(query.question) != 1:
            return _reply(query, dns.rcode.FORMERR)
        wire_name = query.question[0].name
        qname = host_name(wire_name)
        if qname is None or not self.allowed(qname):
            self.counts["refused"] += 1
            if self.on_refused is not None:
                # escaped text for the odd names (dnspython writes \. and \000)
                self.on_refused(qname or wire_name.to_text(omit_final_dot=True).lower(), client)
            return _reply(query, dns.rcode.NXDOMAIN)
        raw = await self._forward(wire, tcp)
        if raw is None:
            self.counts["servfail"] += 1
            return _reply(query, dns.rcode.SERVFAIL)
        try:
            response = dns.message.from_wire(raw)
        except dns.exception.DNSException:
            self.counts["servfail"] += 1
            return _reply(query, dns.rcode.SERVFAIL)
        answered = answer_addresses(response)
        inside = [a for a in answered if _screened(a, self.screened)]
        if inside:
            self.counts["refused"] += 1
            self.counts["internal"] += 1
            log.warning("dns_hook_internal_answer", name=qname, addresses=inside[:8])
            if self.on_refused is not None:
                self.on_refused(qname, client)
            return _reply(query, dns.rcode.NXDOMAIN)
        # (an internal address an explicit CIDR entry opens is answered, but the firewall
        # allows it by number: it never goes into a name's set)
        addrs = [a for a in answered if not is_internal(a)]
        if addrs:
            sets = self.routes.lookup(qname)
            elements = {
                name: [a for a in addrs if (":" in a) == (name[1] == "6")] for name in sets
            }
            elements = {k: v for k, v in elements.items() if v}
            try:
                await self.writer.add(elements)
            except Exception as exc:
                self.counts["servfail"] += 1
                log.error("dns_hook_insert_failed", name=qname, error=str(exc)[:300])
                return _reply(query, dns.rcode.SERVFAIL)
            self.counts["inserted"] += sum(len(v) for v in elements.values())
            if self.on_answer is not None:
                self.on_answer(qname, addrs)
        self.counts["answered"] += 1
        return raw

    async def _forward(self, wire: bytes, tcp: bool) -> bytes | None:
        for up in self.upstreams:
            try:
                # asyncio.timeout, not wait_for: no extra task per query on this hot path
                raw = None
                if not tcp:
                    async with asyncio.timeout(self.timeout):
                        raw = await self._udp_query(wire, up)
                if raw is None or len(raw) < 3 or raw[2] & 0x02:  # TCP, or truncated
                    async with asyncio.timeout(self.timeout):
                        raw = await self._tcp_query(wire, up)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("dns_hook_upstream_failed", upstream=up.hostport,
                            error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            if up != self.upstreams[0]:  # it answered where the first did not: first now
                self.upstreams = (up, *(u for u in self.upstreams if u != up))
                log.info("dns_hook_upstream_preferred", upstream=up.hostport)
            return raw
        return None

    @contextlib.asynccontextmanager
    async def _connected(self, up: Upstream, kind: int) -> AsyncIterator[socket.socket]:
        """A non-blocking socket of the DNS user's, connected to ``up``."""
        family = socket.AF_INET6 if up.ip.version == 6 else socket.AF_INET
        with owned_socket(family, kind, self.sock_uid) as s:
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, (str(up.ip), up.port))
            yield s

    async def _udp_query(self, wire: bytes, up: Upstream) -> bytes:
        loop = asyncio.get_running_loop()
        async with self._connected(up, socket.SOCK_DGRAM) as s:
            await loop.sock_sendall(s, wire)
            while True:
                data = await loop.sock_recv(s, 65535)
                if data[:2] == wire[:2]:
                    return data

    async def _tcp_query(self, wire: bytes, up: Upstream) -> bytes:
        loop = asyncio.get_running_loop()
        async with self._connected(up, socket.SOCK_STREAM) as s:
            await loop.sock_sendall(s, struct.pack("!H", len(wire)) + wire)
            head = await _recv_exactly(loop, s, 2)
            return await _recv_exactly(loop, s, struct.unpack("!H", head)[0])


async def _recv_exactly(loop: asyncio.AbstractEventLoop, s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(s, n - len(buf))
        if not chunk:
            raise asyncio.IncompleteReadError(buf, n)
        buf += chunk
    return buf


def _screened(addr: str, networks: Sequence[IPNetwork]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == n.version and ip in n for n in networks)


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return bytes(response.to_wire())
