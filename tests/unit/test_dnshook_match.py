"""The DNS hook matches query names on labels, not on their dotted text.

A wire-format name is a sequence of labels, and a label may hold any byte, a dot
included: ``[x.githubusercontent][com]`` is a two-label name whose text
(``x\\.githubusercontent.com``) splits on dots into three parts, one of them
``githubusercontent``. It must not pass as a subdomain of ``*.githubusercontent.com``.
The hook is asked exactly as the controller wires it (``Allowlist.match``), and a fake
upstream counts what was forwarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from codetainer.network.allowlist import Allowlist, parse_text
from codetainer.network.dnsconfig import parse_upstreams
from codetainer.network.dnshook import DnsHook, SetRoutes, SetWriter, host_name

ALLOWLIST = "*.githubusercontent.com\napi.github.com\n"


class Writer(SetWriter):
    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []

    async def add(self, elements: Mapping[str, Sequence[str]]) -> None:
        self.calls.append({k: list(v) for k, v in elements.items()})


class Upstream(asyncio.DatagramProtocol):
    """Answers every question with 203.0.113.7, whatever the name: a refusal can only
    come from the hook."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.seen: list[dns.name.Name] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        q = dns.message.from_wire(data)
        self.seen.append(q.question[0].name)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "203.0.113.7"))
        self.transport.sendto(r.to_wire(), addr)


@pytest.fixture
async def hooked() -> AsyncIterator[tuple[DnsHook, Upstream, Writer, list[str]]]:
    loop = asyncio.get_running_loop()
    up = Upstream()
    transport, _ = await loop.create_datagram_endpoint(lambda: up, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    allow = Allowlist(tuple(parse_text(ALLOWLIST, "domains.conf")))
    writer = Writer()
    refused: list[str] = []
    hook = DnsHook(
        "127.0.0.1:0", parse_upstreams(f"127.0.0.1:{port}"),
        SetRoutes({"githubusercontent.com": ("d4_80_443",), "api.github.com": ("d4_80_443",)}),
        writer, allowed=lambda n: allow.match(n) is not None, sock_uid=None,
        on_refused=lambda n, c: refused.append(n), timeout=1.0,
    )
    try:
        yield hook, up, writer, refused
    finally:
        transport.close()
        await hook.close()


async def ask(hook: DnsHook, name: dns.name.Name, *, tcp: bool = False) -> dns.message.Message:
    reply = await hook.answer(dns.message.make_query(name, "A").to_wire(), "127.0.0.1", tcp=tcp)
    assert reply is not None
    return dns.message.from_wire(reply)


def labels(*parts: bytes) -> dns.name.Name:
    return dns.name.Name([*parts, b""])


async def test_a_label_with_a_dot_is_refused_not_forwarded(
    hooked: tuple[DnsHook, Upstream, Writer, list[str]],
) -> None:
    hook, up, writer, refused = hooked
    dotted = labels(b"x.githubusercontent", b"com")
    assert len(dotted.labels) == 3  # two labels and the root: not x / githubusercontent / com
    r = await ask(hook, dotted)
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert up.seen == [] and writer.calls == []
    assert refused == ["x\\.githubusercontent.com"] and hook.counts["refused"] == 1
    # the same name over TCP, and a dot hidden one level deeper
    assert (await ask(hook, dotted, tcp=True)).rcode() == dns.rcode.NXDOMAIN
    deeper = labels(b"a", b"b.githubusercontent", b"com")
    assert (await ask(hook, deeper)).rcode() == dns.rcode.NXDOMAIN
    assert up.seen == []


@pytest.mark.parametrize("odd", [
    b"a\x00", b"\x00", b"a b", b"a\\", b"*", b"caf\xc3\xa9", b"a/b", b"a\n",
])
async def test_a_label_with_a_byte_no_entry_can_hold_is_refused(
    hooked: tuple[DnsHook, Upstream, Writer, list[str]], odd: bytes
) -> None:
    hook, up, writer, _ = hooked
    r = await ask(hook, labels(odd, b"githubusercontent", b"com"))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert up.seen == [] and writer.calls == []


async def test_real_subdomains_forward_case_insensitively(
    hooked: tuple[DnsHook, Upstream, Writer, list[str]],
) -> None:
    hook, up, writer, refused = hooked
    for name in (labels(b"raw", b"githubusercontent", b"com"),
                 labels(b"a", b"b-c", b"githubusercontent", b"com"),
                 labels(b"RAW", b"GitHubUserContent", b"COM"),
                 labels(b"Api", b"GITHUB", b"com"),
                 labels(b"_dmarc", b"x", b"githubusercontent", b"com")):  # as dnsmasq does
        r = await ask(hook, name)
        assert r.rcode() == dns.rcode.NOERROR, name
        assert [rd.to_text() for rr in r.answer for rd in rr] == ["203.0.113.7"]
    assert len(up.seen) == 5 and refused == []
    # the upstream got the question byte for byte (case kept: 0x20 still works)
    assert up.seen[2].labels[:3] == (b"RAW", b"GitHubUserContent", b"COM")
    assert writer.calls == [{"d4_80_443": ["203.0.113.7"]}] * 5
    # the apex of a wildcard, and a name merely ending in the same text, stay refused
    for name in (labels(b"githubusercontent", b"com"), labels(b"xgithubusercontent", b"com"),
                 labels(b"sub", b"api", b"github", b"com")):
        assert (await ask(hook, name)).rcode() == dns.rcode.NXDOMAIN
    assert len(up.seen) == 5


def test_host_name_is_the_label_text_or_none() -> None:
    assert host_name(labels(b"A", b"Example", b"COM")) == "a.example.com"
    assert host_name(labels(b"x-1", b"y")) == "x-1.y"
    assert host_name(dns.name.root) is None
    assert host_name(dns.name.Name([b"a", b"com"])) is None  # relative
    assert host_name(labels(b"a_b", b"com")) == "a_b.com"  # forwarded, as dnsmasq does
    for odd in (b"x.y", b"a\x00", b"a b", b"\xff", b"a\\"):
        assert host_name(labels(odd, b"com")) is None, odd
    assert host_name(labels(b"a" * 63, b"com")) == "a" * 63 + ".com"



class SlowWriter(SetWriter):
    """Takes a while per transaction, as ``nft -f`` does; fails when told to."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict[str, list[str]]] = []
        self.fail = fail

    async def add(self, elements: Mapping[str, Sequence[str]]) -> None:
        self.calls.append({k: list(v) for k, v in elements.items()})
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("nft: refused")


async def test_concurrent_insertions_share_transactions_and_each_waits_for_its_own() -> None:
    from codetainer.network.dnshook import BatchedWriter

    inner = SlowWriter()
    writer = BatchedWriter(inner)
    first = asyncio.ensure_future(writer.add({"d4_443": ["203.0.113.100"]}))
    while not inner.calls:  # its transaction is under way
        await asyncio.sleep(0)
    adds = [writer.add({"d4_443": [f"203.0.113.{i}"]}) for i in range(50)]
    await asyncio.gather(first, *adds)  # each returned only after a transaction that held it
    assert len(inner.calls) == 2, inner.calls  # the first alone, then the 50 that gathered
    assert inner.calls[1]["d4_443"] == sorted(f"203.0.113.{i}" for i in range(50))
    assert writer.transactions == len(inner.calls)
    await writer.add({"d4_443": []})  # nothing to insert: no transaction
    assert len(inner.calls) == writer.transactions

    failing = BatchedWriter(SlowWriter(fail=True))
    results = await asyncio.gather(*(failing.add({"d4_443": [f"203.0.113.{i}"]}) for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results  # none was told "done"


class Silent(asyncio.DatagramProtocol):
    """An upstream that is there and never answers (a black-holed resolver)."""

    def __init__(self) -> None:
        self.received = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1


async def test_a_dead_first_upstream_costs_one_short_wait_then_the_live_one_goes_first() -> None:
    """CoreDNS waits 2 s for the hook (no option in 1.12): the hook must get an answer
    from the second upstream well inside that, and not wait on the dead one again."""
    from codetainer.network.dnshook import UPSTREAM_TIMEOUT

    loop = asyncio.get_running_loop()
    dead, live = Silent(), Upstream()
    t_dead, _ = await loop.create_datagram_endpoint(lambda: dead, local_addr=("127.0.0.1", 0))
    t_live, _ = await loop.create_datagram_endpoint(lambda: live, local_addr=("127.0.0.1", 0))
    ports = [t.get_extra_info("sockname")[1] for t in (t_dead, t_live)]
    hook = DnsHook("127.0.0.1:0", parse_upstreams([f"127.0.0.1:{p}" for p in ports]),
                   SetRoutes({"api.github.com": ("d4_80_443",)}), Writer(),
                   allowed=lambda n: n == "api.github.com", sock_uid=None)
    try:
        t0 = loop.time()
        assert (await ask(hook, labels(b"api", b"github", b"com"))).rcode() == dns.rcode.NOERROR
        first = loop.time() - t0
        assert UPSTREAM_TIMEOUT <= first < 2.0 - 0.5, first  # CoreDNS would still be waiting
        t0 = loop.time()
        for _ in range(3):
            assert (await ask(hook, labels(b"api", b"github", b"com"))).rcode() == dns.rcode.NOERROR
        assert loop.time() - t0 < UPSTREAM_TIMEOUT, "waited on the dead upstream again"
        assert dead.received == 1 and len(live.seen) == 4
        assert [u.port for u in hook.upstreams] == [ports[1], ports[0]]
    finally:
        t_dead.close()
        t_live.close()
        await hook.close()
