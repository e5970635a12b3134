"""DNS config generators (dnsmasq, CoreDNS), log parsing, engine choice, dnscheck."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest
from codetainer.network import dnscheck
from codetainer.network.allowlist import Allowlist, AllowlistError, Entry, EntryKind, parse_text
from codetainer.network.dnsconfig import (
    DnsmasqLogParser,
    DnsOptions,
    Engine,
    SetBackend,
    exec_script,
    generate_corefile,
    generate_dnsmasq,
    parse_coredns_log_line,
    parse_dnsmasq_log_line,
    parse_upstream,
    parse_upstreams,
)
from codetainer.network.dnsplan import screened_networks
from codetainer.network.model import INTERNAL
from hypothesis import given, settings
from hypothesis import strategies as st

UP = parse_upstreams("192.0.2.53,[2001:db8::53]:5353")


def al(text: str) -> Allowlist:
    return Allowlist(tuple(parse_text(text, "d.conf")))


def opts(**kw: object) -> DnsOptions:
    kw.setdefault("upstreams", UP)
    return DnsOptions(**kw)  # type: ignore[arg-type]


def directives(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


# --- dnsmasq ---------------------------------------------------------------------


def test_dnsmasq_base_options() -> None:
    cfg = generate_dnsmasq(al("a.example.com\n"), opts(user="codetainer-dns", max_ttl=120))
    d = directives(cfg.text)
    for line in [
        "no-resolv",
        "no-hosts",
        "listen-address=127.0.0.53",
        "port=53",
        "bind-interfaces",
        "address=/#/",
        "max-cache-ttl=120",
        "max-ttl=120",
        "filter-AAAA",
        "log-queries=extra",
        "log-facility=-",
        "user=codetainer-dns",
        "pid-file=",
    ]:
        assert line in d, line
    assert cfg.engine is Engine.DNSMASQ
    assert cfg.set_timeout >= 2 * 120  # covers cache TTL + client TTL
    assert [s.name for s in cfg.dynamic_sets] == ["d4_80_443"]


def test_dnsmasq_exact_wildcard_and_nesting() -> None:
    text = generate_dnsmasq(
        al("x.com:443\n*.w.com\nn.com\n*.b.n.com:8443\nboth.com\n*.both.com\n"), opts()
    ).text
    d = directives(text)
    # exact: forward the name, take its subdomains back
    assert "server=/x.com/192.0.2.53#53" in d
    assert "server=/x.com/2001:db8::53#5353" in d
    assert "local=/*.x.com/" in d
    assert "nftset=/x.com/4#inet#codetainer#d4_443" in d
    # wildcard: subdomains only
    assert "server=/*.w.com/192.0.2.53#53" in d
    assert "server=/w.com/192.0.2.53#53" not in d
    assert not any(ln.startswith("local=/*.w.com/") for ln in d)
    assert "nftset=/w.com/4#inet#codetainer#d4_80_443" in d
    # deeper wildcard under an exact name: longest match wins in dnsmasq
    assert "local=/*.n.com/" in d and "server=/*.b.n.com/192.0.2.53#53" in d
    assert "nftset=/b.n.com/4#inet#codetainer#d4_8443" in d
    # exact + wildcard on the same domain: everything forwarded, nothing taken back
    assert "server=/both.com/192.0.2.53#53" in d
    assert "local=/*.both.com/" not in d


def test_dnsmasq_exact_under_wildcard_keeps_subdomains() -> None:
    d = directives(generate_dnsmasq(al("*.gh.com:22\napi.gh.com:443\n"), opts()).text)
    assert "local=/*.api.gh.com/" not in d  # *.gh.com allows a.api.gh.com
    assert "nftset=/api.gh.com/4#inet#codetainer#d4_22_443" in d  # union, documented


def test_dnsmasq_ipv6_and_ipset_backend() -> None:
    cfg = generate_dnsmasq(al("x.com:443\n"), opts(ipv6=True), SetBackend.IPSET)
    d = directives(cfg.text)
    assert "filter-AAAA" not in d
    assert "ipset=/x.com/ct-d4_443,ct-d6_443" in d
    assert not any(ln.startswith("nftset=") for ln in d)
    assert {(s.name, s.ipset) for s in cfg.dynamic_sets} == {
        ("d4_443", "ct-d4_443"),
        ("d6_443", "ct-d6_443"),
    }
    cfg = generate_dnsmasq(al("x.com:443\n"), opts(ipv6=True))
    assert "nftset=/x.com/4#inet#codetainer#d4_443,6#inet#codetainer#d6_443" in cfg.text


def test_dnsmasq_ignores_cidr_and_github_entries() -> None:
    d = directives(generate_dnsmasq(al("203.0.113.0/24\n@github\n"), opts()).text)
    assert not any(ln.startswith(("server=", "nftset=", "local=")) for ln in d)
    assert "address=/#/" in d


def bogus(text: str) -> list[str]:
    return [ln.removeprefix("bogus-nxdomain=") for ln in directives(text)
            if ln.startswith("bogus-nxdomain=")]


@pytest.mark.parametrize("backend", list(SetBackend))
@pytest.mark.parametrize("ipv6", [False, True])
def test_dnsmasq_screens_every_internal_network_from_the_model(
    backend: SetBackend, ipv6: bool
) -> None:
    """Rebinding: an answer pointing inside becomes NXDOMAIN before nftset=/ipset= run.
    The networks are model.INTERNAL's, rendered from the data, both families always."""
    cfg = generate_dnsmasq(al("*.wild.test\nexact.test:443\n"), opts(ipv6=ipv6), backend)
    assert bogus(cfg.text) == [*INTERNAL[4], *INTERNAL[6]]
    assert [str(n) for n in cfg.screened] == [*INTERNAL[4], *INTERNAL[6]]
    assert "169.254.0.0/16" in bogus(cfg.text) and "fe80::/10" in bogus(cfg.text)
    # dnsmasq's own rebind screen does not match model.INTERNAL (see dnsconfig's doc)
    assert not any(ln.startswith(("stop-dns-rebind", "rebind-")) for ln in directives(cfg.text))


def test_dnsmasq_screen_leaves_out_what_a_cidr_entry_opens() -> None:
    allow = al("*.wild.test\n10.1.0.0/16:5432\n169.254.0.0/16\n203.0.113.0/24\n[fdaa::/16]\n")
    nets = screened_networks(allow)
    text = generate_dnsmasq(allow, opts()).text
    assert [str(n) for n in nets] == bogus(text)
    assert "169.254.0.0/16" not in bogus(text) and "fdaa::/16" not in bogus(text)
    assert "10.0.0.0/16" in bogus(text) and "10.128.0.0/9" in bogus(text)
    for addr, screened in [("10.1.2.3", False), ("10.2.0.1", True), ("10.0.255.255", True),
                           ("169.254.169.254", False), ("127.0.0.1", True),
                           ("203.0.113.9", False), ("fdaa::3", False), ("fe80::1", True)]:
        ip = ipaddress.ip_address(addr)
        assert any(ip.version == n.version and ip in n for n in nets) is screened, addr


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=4),
       st.integers(0, 2**32 - 1))
def test_screen_is_internal_minus_cidr_entries_exactly(
    cidrs: list[tuple[int, int]], probe: int
) -> None:
    nets = [ipaddress.IPv4Network((a, p), strict=False) for a, p in cidrs]
    allow = al("".join(f"{n}\n" for n in nets) + "x.test\n")
    screened = screened_networks(allow)
    internal = [ipaddress.IPv4Network(n) for n in INTERNAL[4]]
    for ip in {ipaddress.IPv4Address(probe), *(n.network_address for n in internal),
               *(n.broadcast_address for n in internal),
               *(ipaddress.IPv4Address(a) for n in nets
                 for a in (int(n.network_address) - 1, int(n.broadcast_address) + 1)
                 if 0 <= a < 2**32)}:
        want = any(ip in n for n in internal) and not any(ip in n for n in nets)
        got = any(ip.version == n.version and ip in n for n in screened)
        assert got is want, (str(ip), [str(n) for n in nets])


# --- CoreDNS -----------------------------------------------------------------------


@dataclass
class Block:
    header: str
    lines: list[str] = field(default_factory=list)
    children: list[Block] = field(default_factory=list)


def parse_corefile(text: str) -> list[Block]:
    """A small structural parser: ``header {`` … ``}`` blocks, nested."""
    root = Block("<root>")
    stack = [root]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("{"):
            b = Block(line[:-1].strip())
            stack[-1].children.append(b)
            stack.append(b)
        elif line == "}":
            stack.pop()
            assert len(stack) >= 1
        else:
            stack[-1].lines.append(line)
    assert stack == [root], "unbalanced braces"
    return root.children


def blocks_by_zone(text: str) -> dict[str, Block]:
    blocks = parse_corefile(text)
    zones = [b.header for b in blocks]
    assert len(zones) == len(set(zones)), "CoreDNS refuses duplicate zones"
    return {b.header.rsplit(":", 1)[0]: b for b in blocks}


def test_corefile_structure() -> None:
    cfg = generate_corefile(al("x.com:443\n*.w.com\nboth.com\n*.both.com\n"), opts(max_ttl=60))
    z = blocks_by_zone(cfg.text)
    assert set(z) == {"x.com", "w.com", "both.com", "."}
    for name, b in z.items():
        assert "bind 127.0.0.53" in b.lines
        if name != ".":
            assert "forward . 192.0.2.53:53 [2001:db8::53]:5353" in b.lines
            cache = [c for c in b.children if c.header == "cache 60"]
            # dnsmasq's cache size, upstream TTLs under 5 s kept, a failure not cached
            assert cache and cache[0].lines == ["success 10000 60 0", "denial 10000 60 0",
                                                "servfail 0s"]
            log = [c for c in b.children if c.header.startswith("log ")]
            assert log and log[0].lines == ["class denial error"]  # template NXDOMAIN: error
    # exact: subdomains NXDOMAIN, the name itself falls through to forward
    tpl = [c for c in z["x.com"].children if c.header == "template ANY ANY"]
    assert tpl and tpl[0].lines == ['match "^.+[.]x[.]com[.]$"', "rcode NXDOMAIN", "fallthrough"]
    tpl = [c for c in z["w.com"].children if c.header == "template ANY ANY"]
    assert tpl and tpl[0].lines[0] == 'match "^w[.]com[.]$"'
    assert not [c for c in z["both.com"].children if c.header == "template ANY ANY"]
    # AAAA empty unless IPv6
    for name in ("x.com", "w.com", "both.com"):
        aaaa = [c for c in z[name].children if c.header == "template IN AAAA"]
        assert aaaa and aaaa[0].lines == ["rcode NOERROR"]
    catch = z["."]
    assert [c.header for c in catch.children] == ["template ANY ANY"]
    assert catch.children[0].lines == ["rcode NXDOMAIN"]
    assert not any(ln.startswith("forward") for ln in catch.lines)


def test_corefile_ipv6_and_hook() -> None:
    cfg = generate_corefile(al("x.com\n"), opts(ipv6=True, hook="127.0.0.1:5354"))
    z = blocks_by_zone(cfg.text)
    assert "forward . 127.0.0.1:5354" in z["x.com"].lines
    assert not [c for c in z["x.com"].children if c.header == "template IN AAAA"]
    assert {s.name for s in cfg.dynamic_sets} == {"d4_80_443", "d6_80_443"}
    # the hook screens internal answers as dnsmasq's bogus-nxdomain= does; no hook, no screen
    assert cfg.screened == screened_networks(al("x.com\n")) and cfg.screened
    assert generate_corefile(al("x.com\n"), opts()).screened == ()


def test_dev_builds_coredns_with_every_plugin_the_corefile_uses() -> None:
    """``./dev setup`` builds CoreDNS with only COREDNS_PLUGINS: a directive the generator
    starts using must be added there, or the real server refuses the Corefile."""
    dev = (Path(__file__).resolve().parents[2] / "dev").read_text()
    m = re.search(r'^COREDNS_PLUGINS="([a-z0-9 ]+)"$', dev, re.M)
    assert m, "COREDNS_PLUGINS not found in dev"
    built = set(m[1].split())
    text = generate_corefile(al("x.com:443\n*.w.com\nboth.com\n*.both.com\n"),
                             opts(hook="127.0.0.1:5354")).text
    used: set[str] = set()

    def walk(blocks: list[Block], depth: int) -> None:
        for b in blocks:
            if depth == 1:  # a plugin with a block (template, cache, log)
                used.add(b.header.split()[0])
            if depth == 0:
                used.update(ln.split()[0] for ln in b.lines)
            walk(b.children, depth + 1)

    walk(parse_corefile(text), 0)
    assert used == built, (used, built)


def corefile_decision(text: str, qname: str) -> str:
    """What the generated Corefile does with a query: 'forward' or 'NXDOMAIN'.

    Emulates CoreDNS: the most specific zone block, then its templates in order."""
    z = blocks_by_zone(text)
    labels = qname.split(".")
    for i in range(len(labels)):
        zone = ".".join(labels[i:])
        if zone in z:
            block = z[zone]
            break
    else:
        block = z["."]
    for tpl in block.children:
        if tpl.header != "template ANY ANY":
            continue
        match = next((ln for ln in tpl.lines if ln.startswith("match ")), 'match ".*"')
        regex = match.split(" ", 1)[1].strip('"')
        if re.search(regex, qname + "."):
            return "NXDOMAIN"
    return "forward" if any(ln.startswith("forward") for ln in block.lines) else "NXDOMAIN"


LABEL = st.sampled_from(["a", "b", "c", "www", "api"])
DOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "test"]))
ENTRY = st.tuples(st.booleans(), DOMAIN).map(lambda t: ("*." if t[0] else "") + t[1])


@settings(max_examples=300, deadline=None)
@given(st.lists(ENTRY, min_size=1, max_size=6), st.lists(DOMAIN, min_size=1, max_size=6))
def test_corefile_agrees_with_allowlist_match(entries: list[str], queries: list[str]) -> None:
    """Property: for any allowlist, CoreDNS forwards exactly the names match() allows."""
    allow = al("\n".join(entries))
    text = generate_corefile(allow, opts()).text
    for q in queries + [e.removeprefix("*.") for e in entries]:
        want = "forward" if allow.match(q) is not None else "NXDOMAIN"
        assert corefile_decision(text, q) == want, (entries, q)


def dnsmasq_decision(text: str, qname: str) -> str:
    """Emulates dnsmasq's documented domain matching (verified for real in the
    integration test): longest match; ``/D/`` matches D and subdomains, ``/*.D/``
    subdomains only; ``/#/`` matches everything."""
    best: tuple[int, str] = (-1, "NXDOMAIN")
    for ln in directives(text):
        m = re.fullmatch(r"(server|local|address)=/([^/]*)/(.*)", ln)
        if not m:
            continue
        kind, dom, target = m.groups()
        if dom == "#":
            length, hit = 0, True
        elif dom.startswith("*."):
            length, hit = len(dom) - 1, qname.endswith(dom[1:])
        else:
            length, hit = len(dom), qname == dom or qname.endswith("." + dom)
        outcome = "forward" if kind == "server" and target else "NXDOMAIN"
        if hit and length > best[0]:
            best = (length, outcome)
    return best[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(ENTRY, min_size=1, max_size=6), st.lists(DOMAIN, min_size=1, max_size=6))
def test_dnsmasq_agrees_with_allowlist_match(entries: list[str], queries: list[str]) -> None:
    allow = al("\n".join(entries))
    text = generate_dnsmasq(allow, opts()).text
    for q in queries + [e.removeprefix("*.") for e in entries]:
        want = "forward" if allow.match(q) is not None else "NXDOMAIN"
        assert dnsmasq_decision(text, q) == want, (entries, q)


# --- injection ---------------------------------------------------------------------

HOSTILE = [
    "evil.com}",
    "{evil.com",
    "evil.com\nserver=/#/6.6.6.6",
    "a/b.com",
    "a#b.com",
    '"evil".com',
    "'evil'.com",
    "a" * 300 + ".com",
    "x\x00y.com",
    "x\x1by.com",
    "*",
    "0.0.0.0/0",
    "evil.com;rm -rf",
    "evil.com bind 0.0.0.0",
]
SAFE_DNSMASQ = re.compile(r"[a-z0-9=/#*.:,_\-\[\] ()?A-Z]*\Z")


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_entries_rejected_and_never_in_output(bad: str) -> None:
    text = f"good.example.com\n{bad}\n"
    with pytest.raises(AllowlistError) as info:
        al(text)
    assert str(info.value).startswith("d.conf:2: ") or "d.conf:3: " in str(info.value)
    # Nor can the bad text reach a generator by another path: an Entry cannot be made
    # from it at all, whatever its kind, so a generator never sees one.
    raw = bad.lower()
    for kind in EntryKind:
        with pytest.raises(ValueError, match="unvalidated allowlist entry"):
            Entry(kind, raw)


NAME_CHARS = st.text(alphabet=st.sampled_from(list("ab-.*:,/[]{}\"'#; \n\x00\x1b")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(NAME_CHARS, max_size=8))
def test_generated_lines_only_contain_validated_characters(lines: list[str]) -> None:
    try:
        allow = al("\n".join(lines))
    except AllowlistError:
        return
    dm = generate_dnsmasq(allow, opts(), SetBackend.IPSET).text
    for line in dm.splitlines():
        assert SAFE_DNSMASQ.match(line), line
    core = generate_corefile(allow, opts()).text
    blocks_by_zone(core)  # still parses: balanced braces, unique zones
    for line in core.splitlines():
        assert "\x00" not in line and "'" not in line and ";" not in line


def test_comment_source_path_is_sanitised() -> None:
    allow = Allowlist(tuple(parse_text("x.com\n", "/tmp/we ird\nserver=/#/1.1.1.1")))
    text = generate_dnsmasq(allow, opts()).text
    assert "\nserver=/#/" not in text


# --- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "out"),
    [
        ("1.1.1.1", "1.1.1.1#53"),
        (" 1.1.1.1:5353 ", "1.1.1.1#5353"),
        ("1.1.1.1#54", "1.1.1.1#54"),
        ("2606:4700::1111", "2606:4700::1111#53"),
        ("[2606:4700::1111]:5353", "2606:4700::1111#5353"),
    ],
)
def test_parse_upstream(text: str, out: str) -> None:
    assert parse_upstream(text).dnsmasq == out


@pytest.mark.parametrize(
    "bad", ["dns.google", "1.1.1.1:0", "1.1.1.1:99999", "0.0.0.0", "224.0.0.1", "[::1]x", "1.1.1.1/32"]
)
def test_parse_upstream_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream(bad)


def test_parse_upstreams_needs_one() -> None:
    with pytest.raises(ValueError, match="CODETAINER_UPSTREAMS"):
        parse_upstreams(" , ")


@pytest.mark.parametrize(
    "kw",
    [
        {"listen": "localhost"},
        {"port": 0},
        {"max_ttl": 0},
        {"user": "root;x"},
        {"group": "a b"},
        {"hook": "nope"},
        {"upstreams": ()},
    ],
)
def test_dns_options_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        opts(**kw)


def test_exec_script_and_engine_detection() -> None:
    from codetainer.network.dnsconfig import detect_engine

    s = exec_script(Engine.DNSMASQ, "/run/codetainer/dns/dnsmasq.conf")
    assert s == (
        "#!/bin/sh\nexec /usr/sbin/dnsmasq --keep-in-foreground "
        "--conf-file=/run/codetainer/dns/dnsmasq.conf\n"
    )
    s = exec_script(Engine.DNSMASQ, "/tmp/a b;c")
    assert "--conf-file='/tmp/a b;c'" in s
    s = exec_script(Engine.COREDNS, "/run/Corefile", binary="/usr/bin/coredns")
    assert s == "#!/bin/sh\nexec /usr/bin/coredns -conf /run/Corefile\n"
    assert detect_engine("auto", lambda _: "/usr/bin/coredns") is Engine.COREDNS
    assert detect_engine("auto", lambda _: None) is Engine.DNSMASQ
    assert detect_engine("DNSMASQ", lambda _: "/x") is Engine.DNSMASQ
    with pytest.raises(ValueError, match="CODETAINER_DNS_ENGINE"):
        detect_engine("bind9")


# --- refused-name logs -----------------------------------------------------------------


def test_parse_dnsmasq_log_lines() -> None:
    line = "dnsmasq[5854]: 3 127.0.0.1/48556 config x.allowed.test is NXDOMAIN"
    r = parse_dnsmasq_log_line(line)
    assert r is not None and (r.name, r.client) == ("x.allowed.test", "127.0.0.1")
    assert parse_dnsmasq_log_line("dnsmasq[1]: 4 ::1/5 config Evil.TEST. is NXDOMAIN") is not None
    for other in [
        "dnsmasq[5854]: 1 127.0.0.1/51841 reply allowed.test is NXDOMAIN",
        "dnsmasq[5854]: 1 127.0.0.1/51841 reply allowed.test is 203.0.113.10",
        "dnsmasq[5854]: 1 127.0.0.1/51841 forwarded allowed.test to 127.0.0.2",
        "dnsmasq[5854]: started, version 2.90 cachesize 150",
        "",
    ]:
        assert parse_dnsmasq_log_line(other) is None


def test_dnsmasq_log_parser_adds_query_type() -> None:
    p = DnsmasqLogParser(remember=4)
    assert p.feed("dnsmasq[1]: 7 127.0.0.1/1 query[AAAA] bad.test from 127.0.0.1") is None
    r = p.feed("dnsmasq[1]: 7 127.0.0.1/1 config bad.test is NXDOMAIN")
    assert r is not None and (r.name, r.qtype) == ("bad.test", "AAAA")
    for i in range(10):
        p.feed(f"dnsmasq[1]: {i + 100} 127.0.0.1/1 query[A] n{i}.test from 127.0.0.1")
    assert len(p._types) <= 5


def test_parse_coredns_log_lines() -> None:
    def p(s: str) -> str | None:
        r = parse_coredns_log_line("[INFO] " + s)
        return None if r is None else r.name

    assert p("CT_DENIAL all . 127.0.0.1 A evil.test. NXDOMAIN") == "evil.test"
    assert p("CT_DENIAL exact x.com [::1] A a.x.com. NXDOMAIN") == "a.x.com"
    assert p("CT_DENIAL exact x.com 127.0.0.1 A x.com. NXDOMAIN") is None  # upstream said so
    assert p("CT_DENIAL wild w.com 127.0.0.1 A w.com. NXDOMAIN") == "w.com"
    assert p("CT_DENIAL wild w.com 127.0.0.1 A a.w.com. NXDOMAIN") is None
    assert p("CT_DENIAL both b.com 127.0.0.1 A a.b.com. NXDOMAIN") is None
    assert p("CT_DENIAL all . 127.0.0.1 AAAA evil.test. NOERROR") is None
    assert p("random line") is None


# --- dnscheck against a tiny in-process DNS server ------------------------------------

RECORDS = {
    "ok.test.": ("A", ["203.0.113.10", "203.0.113.11"], 42),
    "v6.test.": ("AAAA", ["2001:db8::1"], 30),
}


class _Server(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        resp = dns.message.make_response(q)
        qname = q.question[0].name.to_text()
        qtype = dns.rdatatype.to_text(q.question[0].rdtype)
        if qname == "slow.test.":
            return
        rec = RECORDS.get(qname)
        if rec is None:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        elif rec[0] == qtype:
            resp.answer.append(dns.rrset.from_text_list(qname, rec[2], "IN", qtype, rec[1]))
        self.transport.sendto(resp.to_wire(), addr)  # type: ignore[attr-defined]


@pytest.fixture
async def dns_server() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Server, local_addr=("127.0.0.1", 0))
    yield transport.get_extra_info("sockname")[1]
    transport.close()


async def test_check_dns(dns_server: int) -> None:
    r = await dnscheck.check_dns("127.0.0.1", dns_server, "ok.test", "bad.test", timeout=1)
    assert r.ok and r.answered and r.nxdomain and r.addresses == ("203.0.113.10", "203.0.113.11")
    assert r.latency < 1
    r = await dnscheck.check_dns("127.0.0.1", dns_server, "bad.test", "ok.test", timeout=1)
    assert not r.ok and "expected NXDOMAIN" in r.reason and "expected an answer" in r.reason
    r = await dnscheck.check_dns("127.0.0.1", dns_server, "slow.test", "bad.test", timeout=0.2)
    assert not r.ok and r.allowed_rcode == "TIMEOUT"


async def test_resolve_all(dns_server: int) -> None:
    res = await dnscheck.resolve_all(
        ["ok.test", "v6.test", "bad.test", "slow.test", "ok.test"],
        "127.0.0.1",
        dns_server,
        timeout=0.3,
        ipv6=True,
    )
    assert set(res) == {"ok.test", "v6.test", "bad.test", "slow.test"}
    assert res["ok.test"].addresses == ("203.0.113.10", "203.0.113.11")
    assert res["ok.test"].ttl == 42 and res["ok.test"].error is None
    assert res["v6.test"].addresses == ("2001:db8::1",) and res["v6.test"].ttl == 30
    assert res["bad.test"].error == "NXDOMAIN" and res["bad.test"].addresses == ()
    assert res["slow.test"].error is not None and "no answer" in res["slow.test"].error
    res = await dnscheck.resolve_all(["v6.test"], "127.0.0.1", dns_server, timeout=0.3)
    assert res["v6.test"].addresses == () and res["v6.test"].error is None
