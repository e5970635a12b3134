"""The network controller's parts without the system: plans, the hook, why/allow, status."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest
from codetainer.boot.engine import BootContext, StepError
from codetainer.cli.render import render_network, render_why
from codetainer.control.server import Peer, Request, RequestError
from codetainer.events import EventBus
from codetainer.network.active import AddressNames, RefusedTable
from codetainer.network.allowlist import Allowlist, parse_text
from codetainer.network.compose import agent_identity, build_policy, make_plan, parse_options
from codetainer.network.controller import NetworkController
from codetainer.network.dnsconfig import Engine, parse_upstreams
from codetainer.network.dnshook import DnsHook, NftSetWriter, SetRoutes, SetWriter
from codetainer.network.dnsplan import DnsPlan
from codetainer.network.why import WhyAddress, WhyReport, parse_duration
from codetainer.settings import Settings

ALLOW = """\
api.test
*.cdn.test:443
x.cdn.test            # exact under a wildcard: routed to its own line
203.0.113.0/28:8443
"""


def settings(tmp: Path, **kw: str) -> Settings:
    base = {"run_dir": str(tmp / "run"), "dns_user": "nobody", "upstreams": "192.0.2.53",
            "allowlist": str(tmp / "domains.conf")}
    base.update(kw)
    return Settings(**base)


def allowlist(text: str = ALLOW) -> Allowlist:
    return Allowlist(tuple(parse_text(text, "domains.conf")))


# -- compose -------------------------------------------------------------------------------


def test_plan_groups_names_wildcards_and_networks(tmp_path: Path) -> None:
    opts = parse_options(settings(tmp_path), Engine.DNSMASQ)
    plan = make_plan(allowlist(), opts, "nftables")
    assert plan.names == {"api.test": (80, 443), "x.cdn.test": (80, 443)}
    assert plan.fixed == {(8443,): ("203.0.113.0/28",)}
    assert plan.domain_sets["cdn.test"] == ("d4_443",)
    assert set(plan.groups) == {(80, 443), (443,), (8443,)}
    assert "nftset=/api.test/4#inet#codetainer#d4_80_443" in plan.config.text
    assert "user=nobody" in plan.config.text and "server=/api.test/192.0.2.53#53" in plan.config.text
    policy = build_policy(plan, {(80, 443): ("203.0.113.20",)}, opts)
    keys = {g.key: g for g in policy.groups}
    assert set(keys) == {"80_443", "443", "8443"}  # every dynamic set exists, even empty
    assert [str(n) for n in keys["80_443"].v4] == ["203.0.113.20/32"]
    assert policy.dns_uid == 65534 and policy.dynamic_timeout == plan.config.set_timeout


def test_github_ranges_reach_the_firewall_on_the_entrys_ports(tmp_path: Path) -> None:
    import ipaddress

    opts = parse_options(settings(tmp_path), Engine.DNSMASQ)
    meta = [ipaddress.ip_network("192.0.2.0/28"), ipaddress.ip_network("2001:db8:1::/48")]
    plan = make_plan(allowlist("api.test\n@github:443\n"), opts, "nftables", meta)
    assert plan.fixed == {(443,): ("192.0.2.0/28", "2001:db8:1::/48")}
    policy = build_policy(plan, {}, opts)
    group = {g.key: g for g in policy.groups}["443"]
    assert [str(n) for n in group.v4] == ["192.0.2.0/28"]
    assert [str(n) for n in group.v6] == ["2001:db8:1::/48"]
    # without @github in the allowlist, fetched ranges open nothing
    plain = make_plan(allowlist("api.test\n"), opts, "nftables", meta)
    assert plain.fixed == {}


def test_hook_mode_forwards_to_the_hook_and_fills_nothing(tmp_path: Path) -> None:
    opts = parse_options(settings(tmp_path, dns_engine="dnsmasq"), Engine.DNSMASQ)
    assert opts.hook is None
    hooked = parse_options(settings(tmp_path, dns_engine="dnsmasq"), Engine.DNSMASQ)
    hooked = dataclasses.replace(hooked, hook="127.0.0.1:5354")
    plan = make_plan(allowlist(), hooked, "nftables")
    assert "nftset=" not in plan.config.text
    assert "server=/api.test/127.0.0.1#5354" in plan.config.text
    assert plan.domain_sets["api.test"] == ("d4_80_443",)  # the hook still knows the sets
    core = parse_options(settings(tmp_path), Engine.COREDNS)
    assert core.hook == "127.0.0.1:5354"
    corefile = make_plan(allowlist(), core, "nftables").config.text
    assert "forward . 127.0.0.1:5354" in corefile and "192.0.2.53" not in corefile


@pytest.mark.parametrize(("field", "value", "match"), [
    ("ipv6", "maybe", "CODETAINER_IPV6"),
    ("refresh_min_ttl", "0", "REFRESH_MIN_TTL"),
    ("refresh_max_ttl", "900", "REFRESH_MAX_TTL"),
    ("refresh_grace", "-1", "GRACE"),
    ("dns_user", "no-such-user-ct", "does not exist"),
    ("dns_user", "root", "must not be root"),
    ("upstreams", "dns.google", "not an IP"),
])
def test_bad_settings_name_the_variable(tmp_path: Path, field: str, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_options(settings(tmp_path, **{field: value}), Engine.DNSMASQ)


def test_agent_identity_falls_back_to_uid_1000() -> None:
    assert agent_identity("no-such-user-ct")[0] == 1000
    assert agent_identity("nobody")[0] == 65534
    assert agent_identity("1234")[:2] == (1234, 1234)


# -- the hook ------------------------------------------------------------------------------


def test_domain_sets_and_longest_match_routing() -> None:
    plan = DnsPlan.build(Allowlist(parse_text("a.test\n*.b.a.test:443\n", "t")), ipv6=False)
    assert plan.domain_sets == {"a.test": ("d4_80_443",), "b.a.test": ("d4_443",)}
    routes = SetRoutes(plan.domain_sets)
    assert routes.lookup("a.test") == ("d4_80_443",)
    assert routes.lookup("x.b.a.test.") == ("d4_443",)
    assert routes.lookup("c.a.test") == ("d4_80_443",)
    assert routes.lookup("other.test") == ()
    v6 = DnsPlan.build(Allowlist(parse_text("a.test\n*.b.a.test:443\n", "t")), ipv6=True)
    assert SetRoutes(v6.domain_sets).lookup("x.b.a.test.") == ("d4_443", "d6_443")


def test_nft_writer_refreshes_timeouts_in_one_transaction_and_rejects_garbage() -> None:
    script = NftSetWriter.render({"d4_80_443": ["203.0.113.2", "203.0.113.1"], "d6_443": []})
    assert script.splitlines() == [
        "add element inet codetainer d4_80_443 { 203.0.113.1, 203.0.113.2 }",
        "delete element inet codetainer d4_80_443 { 203.0.113.1, 203.0.113.2 }",
        "add element inet codetainer d4_80_443 { 203.0.113.1, 203.0.113.2 }",
    ]
    with pytest.raises(ValueError):
        NftSetWriter.render({"d4_80_443": ["1.2.3.4 }; flush ruleset"]})
    with pytest.raises(ValueError):
        NftSetWriter.render({"output; flush": ["1.2.3.4"]})


class RecordingWriter(SetWriter):
    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []
        self.fail = False

    async def add(self, elements: Mapping[str, Sequence[str]]) -> None:
        if self.fail:
            raise RuntimeError("nft failed")
        self.calls.append({k: list(v) for k, v in elements.items()})


class FakeUpstream(asyncio.DatagramProtocol):
    def __init__(self, addrs: list[str]) -> None:
        self.addrs = addrs
        self.transport: Any = None
        self.seen = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen += 1
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "CNAME", "edge.cdn.example."))
        r.answer.append(dns.rrset.from_text("edge.cdn.example.", 30, "IN", "A", *self.addrs))
        self.transport.sendto(r.to_wire(), addr)


@pytest.fixture
def free_port() -> Iterator[int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


async def ask(hook: DnsHook, name: str) -> dns.message.Message:
    wire = dns.message.make_query(name, "A").to_wire()
    reply = await hook.answer(wire, "127.0.0.1", tcp=False)
    assert reply is not None
    return dns.message.from_wire(reply)


async def test_hook_inserts_before_replying_refuses_and_fails_closed(free_port: int) -> None:
    loop = asyncio.get_running_loop()
    up = FakeUpstream(["203.0.113.7", "203.0.113.8"])
    transport, _ = await loop.create_datagram_endpoint(lambda: up, local_addr=("127.0.0.1", free_port))
    writer = RecordingWriter()
    refused: list[str] = []
    hook = DnsHook("127.0.0.1:0", parse_upstreams(f"127.0.0.1:{free_port}"),
                   SetRoutes({"api.test": ("d4_80_443",)}), writer,
                   allowed=lambda n: n == "api.test", sock_uid=None,
                   on_refused=lambda n, c: refused.append(n))
    try:
        r = await ask(hook, "api.test")
        assert r.rcode() == dns.rcode.NOERROR
        assert writer.calls == [{"d4_80_443": ["203.0.113.7", "203.0.113.8"]}]  # the CNAME chain's A
        r = await ask(hook, "evil.test")
        assert r.rcode() == dns.rcode.NXDOMAIN and refused == ["evil.test"] and up.seen == 1
        writer.fail = True
        assert (await ask(hook, "api.test")).rcode() == dns.rcode.SERVFAIL
        assert await hook.answer(b"\x00garbage", "127.0.0.1", tcp=False) is None
        transport.close()
        hook.timeout = 0.3
        writer.fail = False
        assert (await ask(hook, "api.test")).rcode() == dns.rcode.SERVFAIL  # upstream gone
        assert hook.counts["servfail"] == 2 and hook.counts["refused"] == 1
    finally:
        transport.close()
        await hook.close()


# -- why / allow tables ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("2h", 7200), ("1d", 86400), ("90", 90)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "8d", "1w", "-1h", "1.5h", "1h; rm"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_refused_table_is_bounded_and_counts() -> None:
    t = RefusedTable(size=3)
    for name in ("a.test", "b.test", "a.test", "c.test", "d.test"):
        t.record(name, "127.0.0.1", "A")
    assert [r["name"] for r in t.top()] == ["a.test", "d.test", "c.test"]
    assert t.get("b.test") is None and t.total == 5
    names = AddressNames(size=2)
    names.feed_dnsmasq("dnsmasq[9]: 7 127.0.0.1/5 reply api.test is 203.0.113.7")
    names.feed_dnsmasq("dnsmasq[9]: 8 127.0.0.1/5 reply api.test is <CNAME>")
    assert names.get("203.0.113.7")[0] == "api.test"  # type: ignore[index]
    assert len(names.rows) == 1


def test_why_report_text_fits_one_screen() -> None:
    rep = WhyReport("api.test", "host", "api.test", "domains.conf:1", rcode="NOERROR")
    rep.addresses = [WhyAddress(f"203.0.113.{i}", ["s4_80_443"], [], []) for i in range(40)]
    assert rep.verdict().startswith("ALLOWED")
    assert len(render_why(rep.as_dict()).splitlines()) <= 24
    rep = WhyReport("192.0.2.9", "ip", None, None)
    denied = [{"proto": "tcp", "port": 443, "packets": 3, "seen_ago": 5, "seen": "last"}]
    rep.addresses = [WhyAddress("192.0.2.9", [], denied, [])]
    text = render_why(rep.as_dict())  # the CLI renders the daemon's data
    assert "NOT ALLOWED" in text and "denied 3x tcp/443" in text


# -- the controller --------------------------------------------------------------------------


class NoServices:
    def __init__(self) -> None:
        self.listeners: list[str] = []

    def add_output_listener(self, name: str, fn: Any) -> None:
        self.listeners.append(name)


def request(op: str, **args: Any) -> Request:
    return Request(op, args, Peer(1, 0, 0))


async def test_hostile_allowlist_fails_the_step_before_anything_is_touched(tmp_path: Path) -> None:
    (tmp_path / "domains.conf").write_text("ok.test\nevil.test}\n*\n0.0.0.0/0\n")
    nc = NetworkController(settings(tmp_path), EventBus(), NoServices())  # type: ignore[arg-type]
    config = nc.steps()[0]
    assert [s.name for s in nc.steps()] == ["network-config", "dns", "firewall", "network-selftest"]
    with pytest.raises(StepError) as exc:
        await config.run(BootContext(settings=nc.settings, events=nc.events))
    for line in (2, 3, 4):
        assert f"domains.conf:{line}:" in exc.value.reason
    assert "3 problem(s)" in exc.value.reason and exc.value.hint
    assert nc.net is None and not (tmp_path / "run").exists()
    assert nc.status() == {"active": False}
    assert render_network(nc.status()) == ["not set up (the network boot steps did not run)"]
    with pytest.raises(StepError, match="has not run"):
        await nc.steps()[1].run(BootContext(settings=nc.settings, events=nc.events))


async def test_ops_before_setup_and_bad_requests(tmp_path: Path) -> None:
    nc = NetworkController(settings(tmp_path), EventBus(), NoServices())  # type: ignore[arg-type]
    with pytest.raises(RequestError) as exc:
        await nc.ops.op_allow(request("allow", target="ok.test", duration="1h"))
    assert exc.value.code == "failed"
    for args in ({"target": "bad}.test"}, {"target": "ok.test", "duration": "soon"}, {"target": "@github"},
                 {}):
        with pytest.raises(RequestError) as exc:
            await nc.ops.op_allow(request("allow", **args))
        assert exc.value.code == "bad_request", args
    with pytest.raises(RequestError):
        await nc.ops.op_why(request("why", target="x" * 300))
    assert await nc.reload() == {"skipped": "the network is not set up (its boot steps did not complete)"}
    await nc.close()


async def test_readiness_checks_skip_when_network_steps_are_not_selected(tmp_path: Path) -> None:
    nc = NetworkController(settings(tmp_path), EventBus(), NoServices())  # type: ignore[arg-type]

    class Engine_:
        records: dict[str, Any] = {"readiness": None}

    class Daemon_:
        engine = Engine_()

    ctx = BootContext(settings=nc.settings, events=nc.events, daemon=Daemon_())
    checks = nc.readiness_checks()
    assert [c.name for c in checks] == ["dns", "firewall"]
    assert [await c.fn(ctx) for c in checks] == ["network steps not selected"] * 2
    Engine_.records["network-config"] = None
    with pytest.raises(StepError):
        await checks[1].fn(ctx)


def test_dns_output_feeds_refused_names_and_address_names(tmp_path: Path) -> None:
    nc = NetworkController(settings(tmp_path), EventBus(), NoServices())  # type: ignore[arg-type]
    lines = [
        "dnsmasq[9]: 5 127.0.0.1/40000 query[AAAA] evil.test from 127.0.0.1",
        "dnsmasq[9]: 5 127.0.0.1/40000 config evil.test is NXDOMAIN",
        "dnsmasq[9]: 6 127.0.0.1/40001 reply api.test is 203.0.113.7",
    ]
    for line in lines:
        nc._on_dns_output("stdout", line)
    row = nc.refused.get("evil.test")
    assert row is not None and row["count"] == 1 and row["qtype"] == "AAAA"
    assert row["last"] <= time.time()
    assert nc.addr_names.get("203.0.113.7")[0] == "api.test"  # type: ignore[index]
