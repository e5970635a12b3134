"""Rendered firewall rules (nftables and iptables) and the validation in front of them."""

from __future__ import annotations

import ipaddress
import json
import string
from pathlib import Path

import pytest
from codetainer.network import firewall_ipt as ipt
from codetainer.network import firewall_nft as nft
from codetainer.network import model
from codetainer.network.firewall import (
    DnsLimit,
    FirewallPolicy,
    InboundPort,
    PortGroup,
    SelfTestResult,
    parse_address,
    parse_inbound,
    parse_network,
)
from codetainer.network.firewall_policy import dns_name_bound, parse_dns_rate
from hypothesis import given, settings
from hypothesis import strategies as st


def pol(**kw: object) -> FirewallPolicy:
    groups = kw.pop("groups", None) or {
        (443, 80): ["203.0.113.10", "203.0.113.0/28", "2001:db8::1"],
        (8443,): ["198.51.100.7"],
    }
    return FirewallPolicy.build(groups, dns_uid=101, upstreams=["192.0.2.53", "2001:db8::53"], **kw)  # type: ignore[arg-type]


def rules_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("add rule")]


def index(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines) if needle in line)


# -- validation ----------------------------------------------------------------------------

HOSTILE = [
    "1.2.3.4; flush ruleset",
    "1.2.3.4 }\nadd rule inet filter output accept",
    "1.2.3.4\n",
    " 1.2.3.4",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/7",
    "10.0.0.1/8",  # host bits set
    "1.2.3.4/33",
    "fe80::1%eth0",
    "",
    "example.com",
    "1.2.3.4\x00",
    "{1.2.3.4}",
    '"1.2.3.4"',
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_addresses_rejected(value: str) -> None:
    with pytest.raises(ValueError):
        parse_network(value)
    with pytest.raises(ValueError):
        PortGroup.of((443,), [value])


@pytest.mark.parametrize("value", [0, 65536, -1, True, "443", 44.3])
def test_bad_ports_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        PortGroup.of((value,), ["203.0.113.1"])  # type: ignore[arg-type]


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="ipv6 policy"):
        pol(ipv6="maybe")
    with pytest.raises(ValueError, match="network"):
        FirewallPolicy.build({}, dns_uid=1, upstreams=["8.8.8.0/24"])
    with pytest.raises(ValueError):
        FirewallPolicy.build({}, dns_uid=-1)
    with pytest.raises(ValueError):
        FirewallPolicy((), dns_uid="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate"):
        FirewallPolicy((PortGroup((443,)), PortGroup((443,))), dns_uid=1)
    with pytest.raises(ValueError):
        PortGroup((443,), v4=("1.2.3.4; drop",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PortGroup((443,), v4=(ipaddress.IPv6Network("2001:db8::/32"),))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FirewallPolicy((), dns_uid=1, dynamic_timeout=0)


def test_groups_merge_collapse_and_shape() -> None:
    p = FirewallPolicy.build(
        {(443, 80): ["203.0.113.1", "203.0.113.0/30"], (80, 443): ["203.0.113.2", "2001:db8::/64"]},
        dns_uid=1,
    )
    (g,) = p.groups
    assert g.ports == (80, 443) and g.key == "80_443"
    assert g.v4 == (ipaddress.IPv4Network("203.0.113.0/30"),)
    assert g.v6 == (ipaddress.IPv6Network("2001:db8::/64"),)
    assert g.set_names() == ("s4_80_443", "d4_80_443", "s6_80_443", "d6_80_443")
    other = FirewallPolicy.build({(80, 443): ["198.51.100.1"]}, dns_uid=1)
    assert p.shape() == other.shape()
    assert p.shape() != FirewallPolicy.build({(443,): []}, dns_uid=1).shape()
    assert parse_address("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable + "\x00{}\"';\u2028", max_size=60))
def test_anything_accepted_renders_as_a_plain_address(value: str) -> None:
    try:
        group = PortGroup.of((443,), [value])
    except ValueError:
        return
    baseline = nft.render_apply(FirewallPolicy((PortGroup((443,)),), dns_uid=1)).splitlines()
    text = nft.render_apply(FirewallPolicy((group,), dns_uid=1)).splitlines()
    assert len(text) == len(baseline) + 1  # exactly one extra line: the element
    (extra,) = [line for line in text if line.startswith("add element") and line.split()[4].startswith("s")]
    inside = extra.split("{ ", 1)[1].removesuffix(" }")
    assert set(inside) <= set(string.hexdigits + ".:/")
    assert ipaddress.ip_network(inside) in (*group.v4, *group.v6)


@given(st.ip_addresses())
def test_every_real_address_is_accepted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    group = PortGroup.of((443,), [str(addr)])
    assert (group.v4 + group.v6)[0].network_address == addr  # type: ignore[operator]


# -- nftables ------------------------------------------------------------------------------


def test_nft_apply_declares_sets_and_fills_static_ones() -> None:
    text = nft.render_apply(pol())
    assert text.startswith("add table inet codetainer\n")
    assert "delete table" not in text
    assert "add set inet codetainer s4_80_443 { type ipv4_addr; flags interval; }" in text
    assert "add set inet codetainer d4_80_443 { type ipv4_addr; flags timeout; timeout 3600s; }" in text
    assert "add set inet codetainer denied4 { type ipv4_addr . inet_proto . inet_service;" in text
    assert (
        "flush set inet codetainer s4_80_443\nadd element inet codetainer s4_80_443 { 203.0.113.0/28 }"
        in text
    )
    assert "add element inet codetainer s6_80_443 { 2001:db8::1 }" in text
    assert "add element inet codetainer upstream4 { 192.0.2.53 }" in text
    # dynamic sets are never flushed: the DNS server's additions survive a reload
    assert "flush set inet codetainer d4" not in text
    assert "policy drop" in text


def test_nft_rule_order() -> None:
    rules = rules_of(nft.render_apply(pol()))
    assert 'oif "lo" accept' in rules[0]
    est = index(rules, "ct state established,related accept")
    ssh = index(rules, "tcp dport 22 goto deny")
    first_allow = index(rules, "@s4_80_443 accept")
    dns = index(rules, "meta skuid 101 meta l4proto { tcp, udp } th dport 53 ip daddr @upstream4 accept")
    assert est < index(rules, "ct state invalid drop") < dns < ssh < first_allow
    assert "tcp dport { 80, 443 } ip daddr @s4_80_443 accept" in rules[first_allow]
    assert any("tcp dport 8443 ip daddr @d4_8443 accept" in r for r in rules)
    output = [r for r in rules if r.startswith("add rule inet codetainer output ")]
    assert output[-1] == "add rule inet codetainer output goto deny"
    assert rules[-2].endswith("deny meta l4proto tcp reject with tcp reset")
    assert rules[-1].endswith("deny reject with icmpx type admin-prohibited")
    assert any("update @denied4 { ip daddr . meta l4proto . th dport }" in r for r in rules)


def test_udp_screen_precedes_the_conntrack_shortcut() -> None:
    rules = rules_of(nft.render_apply(pol()))
    assert index(rules, "meta l4proto udp meta skuid != 101 goto deny") < index(rules, "ct state established")
    for v in (4, 6):
        lines = ipt.render_rules(pol(ipv6="allowlist"), v).splitlines()
        screen = index(lines, "-p udp -m owner ! --uid-owner 101 -j CODETAINER-DENY")
        assert screen < index(lines, "ESTABLISHED")


@pytest.mark.parametrize("ipv6", ["deny", "allowlist"])
def test_internal_screen_sits_between_static_and_dynamic_sets(ipv6: str) -> None:
    """Explicit networks and screened refresh results (static sets) pass; what the DNS
    server put in a dynamic set never opens an internal address."""
    rules = rules_of(nft.render_apply(pol(ipv6=ipv6)))
    screen4 = index(rules, "ip daddr { 0.0.0.0/8, 10.0.0.0/8, ")
    assert "169.254.0.0/16" in rules[screen4] and rules[screen4].endswith("goto deny")
    assert max(index(rules, "@s4_80_443 accept"), index(rules, "@s4_8443 accept")) < screen4
    assert screen4 < min(index(rules, "@d4_80_443 accept"), index(rules, "@d4_8443 accept"))
    if ipv6 == "allowlist":
        screen6 = index(rules, "ip6 daddr { ::/127, ")
        assert "fdaa::/16" in rules[screen6] and "fe80::/10" in rules[screen6]
        assert index(rules, "@s6_80_443 accept") < screen6 < index(rules, "@d6_80_443 accept")
    lines = ipt.render_rules(pol(ipv6=ipv6), 4).splitlines()
    screen = index(lines, "-d 169.254.0.0/16 -j CODETAINER-DENY")
    assert index(lines, "ct-s4_8443 dst -j ACCEPT") < screen < index(lines, "ct-d4_80_443 dst -j ACCEPT")


def test_only_the_dns_user_reaches_the_hook() -> None:
    """The hook (CoreDNS forwards allowlisted names to it; it fills the dynamic sets) is
    the DNS user's alone: its address and port come from the policy, the rule sits before
    the loopback accept, in both backends, for the hook's family only."""
    with pytest.raises(ValueError):
        pol(dns_hook=("127.0.0.1", 0))
    with pytest.raises(ValueError):
        pol(dns_hook=("127.0.0.1; flush ruleset", 5354))
    rules = rules_of(nft.render_apply(pol(dns_hook=("127.0.0.1", 5354))))
    hook = index(rules, "ip daddr 127.0.0.1 th dport 5354 meta skuid != 101 goto deny")
    assert "meta l4proto { tcp, udp }" in rules[hook]
    assert hook < index(rules, 'oif "lo" accept')
    six = rules_of(nft.render_apply(pol(dns_hook=("::1", 5399))))
    assert index(six, "ip6 daddr ::1 th dport 5399 meta skuid != 101 goto deny") < index(six, 'oif "lo"')
    assert "5354" not in nft.render_apply(pol())  # no hook, no rule
    lines = ipt.render_rules(pol(dns_hook=("127.0.0.1", 5354)), 4).splitlines()
    for proto in ("udp", "tcp"):
        rule = (f"-A CODETAINER-OUT -d 127.0.0.1 -p {proto} --dport 5354 "
                "-m owner ! --uid-owner 101 -j CODETAINER-DENY")
        assert index(lines, rule) < index(lines, "-o lo -j ACCEPT")
    assert "5354" not in ipt.render_rules(pol(dns_hook=("127.0.0.1", 5354)), 6)
    assert "5354" not in ipt.render_rules(pol(), 4)


def test_is_internal() -> None:
    from codetainer.network.model import is_internal

    for a in ("169.254.169.254", "10.1.2.3", "127.0.0.1", "100.64.0.1", "172.31.255.255",
              "192.168.0.1", "0.0.0.0", "::1", "fe80::1", "fdaa::3", "::ffff:10.0.0.1", "224.0.0.1"):
        assert is_internal(a), a
    for a in ("203.0.113.10", "192.0.2.1", "8.8.8.8", "2001:db8::1", "fd00:ce:1::10", "172.32.0.1",
              "not an address"):
        assert not is_internal(a), a


def test_nft_ipv6_policies() -> None:
    deny = "\n".join(rules_of(nft.render_apply(pol(ipv6="deny"))))
    assert "ip6 daddr @s6_80_443" not in deny and "@d6_" not in deny
    # a configured IPv6 upstream stays the DNS user's (Fly's resolver under `deny`)
    assert "meta skuid 101 meta l4proto { tcp, udp } th dport 53 ip6 daddr @upstream6 accept" in deny
    v4_only = FirewallPolicy.build({(443,): ["203.0.113.10"]}, dns_uid=101, upstreams=["192.0.2.53"])
    assert "@upstream6 accept" not in "\n".join(rules_of(nft.render_apply(v4_only)))
    allow = "\n".join(rules_of(nft.render_apply(pol(ipv6="allowlist"))))
    assert "tcp dport { 80, 443 } ip6 daddr @s6_80_443 accept" in allow
    assert "ip6 daddr @upstream6 accept" in allow
    fly = rules_of(nft.render_apply(pol(ipv6="fly")))
    text = "\n".join(fly)
    assert "ip6 daddr fdaa::/16 tcp sport 22 accept" in text
    assert "meta skuid 101 ip6 daddr fdaa::3 meta l4proto { tcp, udp } th dport 53 accept" in text
    assert "ip6 daddr @s6_80_443" not in text
    # stateless rules come before conntrack is consulted
    assert index(fly, "fdaa::/16") < index(fly, "ct state")


def test_nft_denied_log_off() -> None:
    assert "update @denied" not in nft.render_apply(pol(log_denied=False))


def test_nft_update_touches_only_static_sets() -> None:
    text = nft.render_update(pol())
    assert set(line.split()[0] for line in text.splitlines()) == {"flush", "add"}
    assert all(" set " in line or "add element" in line for line in text.splitlines())
    assert "flush set inet codetainer s4_8443\nadd element inet codetainer s4_8443 { 198.51.100.7 }" in text
    assert "flush set inet codetainer s6_8443\n" in text
    assert "d4_" not in text and "upstream" not in text and "rule" not in text


def test_nft_additions_only_add_what_is_new_else_none() -> None:
    """The first refresh after an apply adds what resolving found, without the flush (an
    interval set flushed of its elements makes the kernel wait out an RCU grace period);
    anything else (an element gone, other groups) is render_update's whole rewrite."""
    before = pol(groups={(443, 80): ["203.0.113.0/28"], (8443,): []})
    after = pol(groups={(443, 80): ["203.0.113.0/28", "198.51.100.9", "2001:db8::1"],
                        (8443,): ["198.51.100.7"]})
    text = nft.render_additions(before, after)
    assert text is not None
    assert text.splitlines() == [
        "add element inet codetainer s4_80_443 { 198.51.100.9 }",
        "add element inet codetainer s6_80_443 { 2001:db8::1 }",
        "add element inet codetainer s4_8443 { 198.51.100.7 }",
    ]
    assert nft.render_additions(after, after) == ""  # nothing new: no transaction
    assert nft.render_additions(after, before) is None  # elements go: flush and refill
    # an address absorbed into a larger network (collapsed) is a change, not an addition
    merged = pol(groups={(443, 80): ["203.0.113.0/27"], (8443,): []})
    assert nft.render_additions(before, merged) is None
    assert nft.render_additions(before, pol(groups={(22,): ["203.0.113.0/28"]})) is None


def test_nft_obsolete_sets_and_carry_over() -> None:
    existing = {"sets": {"s4_22": {}, "s4_80_443": {}}, "chains": ["output", "deny", "old"]}
    text = nft.render_apply(pol(), existing)
    assert "delete set inet codetainer s4_22" in text
    assert "delete chain inet codetainer old" in text
    carry = {
        "d4_80_443": [(ipaddress.IPv4Address("203.0.113.30"), 120)],
        "s4_8443": [(ipaddress.IPv4Address("1.1.1.1"), 5)],
    }
    replaced = nft.render_apply(pol(), existing, replace_table=True, carry=carry)  # type: ignore[arg-type]
    assert replaced.startswith("add table inet codetainer\ndelete table inet codetainer\nadd table")
    assert "add element inet codetainer d4_80_443 { 203.0.113.30 timeout 120s }" in replaced
    assert "1.1.1.1" not in replaced  # only dynamic sets are carried
    assert "delete set" not in replaced


def test_nft_parse_denied_and_table() -> None:
    listing = {"nftables": [{"metainfo": {}}, {"set": {"name": "denied4", "elem": [
        {"elem": {"val": {"concat": ["192.0.2.9", "udp", 53]}, "expires": 3500,
                  "counter": {"packets": 2, "bytes": 58}}},
        {"elem": {"val": {"concat": ["192.0.2.9", "tcp", 443]}, "expires": 3599, "counter": {"packets": 7}}},
        {"elem": {"val": {"concat": ["not an ip", "tcp", 443]}, "expires": 1}},
    ]}}, {"chain": {"name": "output"}}]}
    table = nft.parse_table(json.dumps(listing))
    assert table["chains"] == ["output"]
    denied = nft.parse_denied(table["sets"]["denied4"], 3600)
    assert [(d.addr, d.proto, d.port, d.packets, d.seen_ago) for d in denied] == [
        ("192.0.2.9", "udp", 53, 2, 100.0),
        ("192.0.2.9", "tcp", 443, 7, 1.0),
    ]
    assert nft._networks({"prefix": {"addr": "10.0.0.0", "len": 8}}) == [ipaddress.ip_network("10.0.0.0/8")]
    assert nft._networks({"range": ["10.0.0.0", "10.0.0.3"]}) == [ipaddress.ip_network("10.0.0.0/30")]
    assert nft._networks({"elem": {"val": "10.0.0.1", "expires": 3}}) == [ipaddress.ip_network("10.0.0.1/32")]
    assert nft._networks({"weird": 1}) == []


# -- iptables ------------------------------------------------------------------------------


def test_ipt_rules_v4() -> None:
    text = ipt.render_rules(pol(), 4, add_jumps=("INPUT", "OUTPUT"))
    lines = text.splitlines()
    assert lines[:6] == [
        "*filter",
        ":CODETAINER-OUT - [0:0]",
        ":CODETAINER-IN - [0:0]",
        ":CODETAINER-DENY - [0:0]",
        "-I OUTPUT 1 -j CODETAINER-OUT",
        "-I INPUT 1 -j CODETAINER-IN",
    ]
    assert lines[-1] == "COMMIT"
    assert (
        "-A CODETAINER-OUT -p tcp -m multiport --dports 80,443 -m set --match-set ct-s4_80_443 dst -j ACCEPT"
        in lines
    )
    assert "-A CODETAINER-OUT -p tcp --dport 8443 -m set --match-set ct-d4_8443 dst -j ACCEPT" in lines
    assert (
        "-A CODETAINER-OUT -p udp --dport 53 -m owner --uid-owner 101 "
        "-m set --match-set ct-upstream4 dst -j ACCEPT" in lines
    )
    assert index(lines, "--dport 22 -j CODETAINER-DENY") < index(lines, "ct-s4_80_443")
    assert lines[-3] == "-A CODETAINER-DENY -p tcp -j REJECT --reject-with tcp-reset"
    assert lines[-2] == "-A CODETAINER-DENY -j REJECT --reject-with icmp-admin-prohibited"
    # counting comes before adding ("add --exist" would reset the counters)
    assert index(lines, "-p tcp -m set --match-set ct-denied4 dst,dst") < index(
        lines, "-p tcp -j SET --add-set ct-denied4"
    )
    assert "-I " not in ipt.render_rules(pol(), 4)
    only_in = ipt.render_rules(pol(), 4, add_jumps=["INPUT"])
    assert "-I INPUT 1 -j CODETAINER-IN" in only_in and "-I OUTPUT" not in only_in


def test_ipt_rules_v6_policies() -> None:
    deny = ipt.render_rules(pol(ipv6="deny"), 6)
    assert "ct-s6" not in deny and "conntrack" in deny
    assert "-p udp --dport 53 -m owner --uid-owner 101 -m set --match-set ct-upstream6 dst -j ACCEPT" in deny
    assert "--reject-with adm-prohibited" in deny
    allow = ipt.render_rules(pol(ipv6="allowlist"), 6)
    assert "-m set --match-set ct-s6_80_443 dst -j ACCEPT" in allow
    fly = ipt.render_rules(pol(ipv6="fly"), 6)
    assert "-A CODETAINER-OUT -d fdaa::/16 -p tcp --sport 22 -j ACCEPT" in fly
    assert "-d fdaa::3 -p udp --dport 53 -m owner --uid-owner 101 -j ACCEPT" in fly
    assert "conntrack" not in fly  # Fly has no IPv6 conntrack


def test_ipt_many_ports_are_chunked() -> None:
    ports = tuple(range(1000, 1020))
    text = ipt.render_rules(pol(groups={ports: ["203.0.113.1"]}), 4)
    assert "--dports 1000,1001,1002,1003,1004,1005,1006,1007,1008,1009,1010,1011,1012,1013,1014 " in text
    assert "--dports 1015,1016,1017,1018,1019 " in text


def test_ipt_ipsets_swap_atomically() -> None:
    text = ipt.render_ipsets(pol())
    assert "create ct-s4_80_443 hash:net family inet -exist" in text
    assert "create ct-d4_80_443 hash:ip family inet timeout 3600 -exist" in text
    assert "create ct-denied6 hash:ip,port family inet6 timeout 3600 counters maxelem 4096 -exist" in text
    assert (
        "create ct-s4_80_443-n hash:net family inet -exist\nflush ct-s4_80_443-n\n"
        "add ct-s4_80_443-n 203.0.113.0/28 -exist\nswap ct-s4_80_443-n ct-s4_80_443\ndestroy ct-s4_80_443-n"
    ) in text
    update = ipt.render_ipsets(pol(), static_only=True)
    assert "upstream" not in update and "ct-d4" not in update
    assert "swap ct-s6_8443-n ct-s6_8443" in update


def test_ipt_parsers() -> None:
    listing = (
        "Name: ct-denied4\nType: hash:ip,port\nHeader: family inet timeout 3600 counters\nMembers:\n"
        "192.0.2.9,tcp:443 timeout 3590 packets 3 bytes 180\n192.0.2.8,udp:53 timeout 10 packets 1 bytes 58\n"
    )
    denied = ipt.parse_denied_list(listing, 3600)
    assert [(d.addr, d.proto, d.port, d.packets, d.seen_ago) for d in denied] == [
        ("192.0.2.9", "tcp", 443, 3, 10.0),
        ("192.0.2.8", "udp", 53, 1, 3590.0),
    ]
    v6 = ipt.parse_denied_list("Members:\nfd00::1,tcp:22 timeout 5 packets 1 bytes 80\n", 3600)
    assert v6[0].addr == "fd00::1" and v6[0].port == 22
    save = (
        "create ct-s4_80_443 hash:net\nadd ct-s4_80_443 203.0.113.0/28\n"
        "create other hash:ip\nadd other 1.1.1.1\ncreate ct-x-n hash:ip\n"
    )
    assert ipt.parse_ipset_save(save) == {"ct-s4_80_443": ["203.0.113.0/28"]}


# -- self-test verdicts --------------------------------------------------------------------


def test_selftest_verdicts() -> None:
    good = SelfTestResult("connected", 1.0, "ECONNREFUSED", 0.2, {"192.0.2.53": ("EPERM", "ECONNREFUSED")})
    assert good.ok
    slow = SelfTestResult("connected", 1.0, "ECONNREFUSED", 2500.0, {})
    assert "only after" in slow.problems()[0]
    bad = SelfTestResult("timeout", 5000.0, "connected", 1.0, {"192.0.2.53": ("answered", "connected")})
    problems = bad.problems()
    assert len(problems) == 3
    assert "did not connect" in problems[0] and "not refused" in problems[1] and "not blocked" in problems[2]


# -- ingress: the input chain and the published ports --------------------------------------


def chain(rules: list[str], name: str) -> list[str]:
    prefix = f"add rule inet codetainer {name} "
    return [r.removeprefix(prefix) for r in rules if r.startswith(prefix)]


def ipt_chain(text: str, name: str) -> list[str]:
    return [line.removeprefix(f"-A {name} ") for line in text.splitlines() if line.startswith(f"-A {name} ")]


def test_nft_input_chain_drops_all_but_replies_and_plumbing() -> None:
    text = nft.render_apply(pol())
    assert "add chain inet codetainer input { type filter hook input priority filter; policy drop; }" in text
    assert "flush chain inet codetainer input" in text
    assert chain(rules_of(text), "input") == [
        'iif "lo" accept',
        "ip6 hoplimit 255 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept",
        "ip6 hoplimit 1 ip6 saddr fe80::/10 icmpv6 type mld-listener-query accept",
        "ct state invalid drop",
        "ct direction reply ct state established,related accept",
    ]
    # an older table without an input chain gets one; ours is never deleted as obsolete
    assert "delete chain" not in nft.render_apply(pol(), {"sets": {}, "chains": ["output", "deny"]})
    assert "input" in nft.CHAINS


def test_nft_output_shortcut_is_for_the_containers_own_connections() -> None:
    output = chain(rules_of(nft.render_apply(pol())), "output")
    shortcut = [r for r in output if "ct state established" in r]
    assert shortcut == ["ct direction original ct state established,related accept"]
    assert not any("ct direction reply" in r for r in output)  # nothing published: no answers


def test_nft_published_ports() -> None:
    p = pol(inbound=("tcp/8080", "udp/5353", "tcp/443", "tcp/8080"))
    assert [str(x) for x in p.inbound] == ["tcp/443", "tcp/8080", "udp/5353"]
    rules = rules_of(nft.render_apply(p))
    inp = chain(rules, "input")
    assert inp[-2:] == [
        "ct direction original tcp dport { 443, 8080 } accept",
        "ct direction original udp dport 5353 accept",
    ]
    assert inp.index("ct state invalid drop") < inp.index(inp[-2])
    output = chain(rules, "output")
    tcp = output.index("ct direction reply ct state established tcp sport { 443, 8080 } accept")
    udp = output.index("ct direction reply ct state established udp sport 5353 accept")
    # a published UDP port answers before the screen that denies UDP to every uid but DNS
    screen = output.index("meta l4proto udp meta skuid != 101 goto deny")
    assert max(tcp, udp) < screen
    assert p.shape() != pol().shape()  # a changed setting re-applies the whole ruleset


def test_nft_fly_input_is_stateless_and_narrow() -> None:
    inp = chain(rules_of(nft.render_apply(pol(ipv6="fly", inbound=("tcp/8080",)))), "input")
    ssh = inp.index("ip6 saddr fdaa::/16 tcp dport 22 accept")
    dns = inp.index("ip6 saddr fdaa::3 meta l4proto { tcp, udp } th sport 53 accept")
    assert max(ssh, dns) < inp.index("ct state invalid drop")  # before conntrack is consulted
    assert sum("fdaa" in r for r in inp) == 2
    assert not any("fdaa" in r for r in chain(rules_of(nft.render_apply(pol())), "input"))


def test_ipt_input_chain_both_families() -> None:
    for v in (4, 6):
        text = ipt.render_rules(pol(ipv6="allowlist"), v)
        inp = ipt_chain(text, "CODETAINER-IN")
        assert inp[0] == "-i lo -j ACCEPT"
        assert inp[-1] == "-j DROP"  # INPUT's own policy is not ours: our chain ends it
        assert "-m conntrack --ctstate INVALID -j DROP" in inp
        assert "-m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT" in inp
        assert not any("ORIGINAL" in r for r in inp)
        out = ipt_chain(text, "CODETAINER-OUT")
        assert "-m conntrack --ctstate ESTABLISHED,RELATED --ctdir ORIGINAL -j ACCEPT" in out
        assert not any("REPLY" in r for r in out)
        nd = [r for r in inp if "ipv6-icmp" in r]
        if v == 4:
            assert nd == []
        else:
            assert nd == [
                "-p ipv6-icmp --icmpv6-type neighbour-solicitation -m hl --hl-eq 255 -j ACCEPT",
                "-p ipv6-icmp --icmpv6-type neighbour-advertisement -m hl --hl-eq 255 -j ACCEPT",
                "-p ipv6-icmp --icmpv6-type router-advertisement -m hl --hl-eq 255 -j ACCEPT",
                "-s fe80::/10 -p ipv6-icmp --icmpv6-type 130 -m hl --hl-eq 1 -j ACCEPT",
            ]


def test_ipt_published_ports() -> None:
    ports = tuple(f"tcp/{p}" for p in range(9000, 9020))
    for v in (4, 6):
        text = ipt.render_rules(pol(inbound=(*ports, "udp/5353")), v)
        inp = ipt_chain(text, "CODETAINER-IN")
        new = "-m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL -j ACCEPT"
        assert inp[-4:] == [
            f"-p tcp -m multiport --dports {','.join(str(p) for p in range(9000, 9015))} {new}",
            f"-p tcp -m multiport --dports {','.join(str(p) for p in range(9015, 9020))} {new}",
            f"-p udp --dport 5353 {new}",
            "-j DROP",
        ]
        out = ipt_chain(text, "CODETAINER-OUT")
        answer = out.index("-p udp --sport 5353 -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT")
        assert answer < out.index("-p udp -m owner ! --uid-owner 101 -j CODETAINER-DENY")
        assert sum("--ctdir REPLY" in r for r in out) == 3


def test_ipt_fly_input() -> None:
    fly = ipt.render_rules(pol(ipv6="fly", inbound=("tcp/8080",)), 6)
    inp = ipt_chain(fly, "CODETAINER-IN")
    assert "-s fdaa::/16 -p tcp --dport 22 -j ACCEPT" in inp
    assert "-s fdaa::3 -p udp --sport 53 -j ACCEPT" in inp and "-s fdaa::3 -p tcp --sport 53 -j ACCEPT" in inp
    assert inp[-1] == "-j DROP"
    assert "conntrack" not in fly and "8080" not in fly  # no conntrack, so no published ports either
    v4 = ipt.render_rules(pol(ipv6="fly", inbound=("tcp/8080",)), 4)
    assert "fdaa" not in v4 and "--dport 8080 -m conntrack" in v4


@pytest.mark.parametrize("value", ["8080", "8080/tcp", "TCP/8080", "tcp/", "tcp/0", "tcp/65536", "tcp/08080",
                                   "tcp/+80", "tcp/8080-8090", "sctp/80", "tcp/80 ", "tcp/²", "tcp//80"])
def test_inbound_port_validation(value: str) -> None:
    with pytest.raises(ValueError):
        InboundPort.parse(value)
    with pytest.raises(ValueError):
        pol(inbound=(value,))


def test_parse_inbound() -> None:
    assert parse_inbound("") == () == parse_inbound("  ")
    parsed = parse_inbound("udp/53, tcp/8080,tcp/22,tcp/8080")
    assert [str(p) for p in parsed] == ["tcp/22", "tcp/8080", "udp/53"]
    assert parse_inbound("tcp/65535") == (InboundPort("tcp", 65535),)
    with pytest.raises(ValueError, match="protocol comes first"):
        parse_inbound("8080/tcp")
    with pytest.raises(ValueError, match="is not tcp/PORT"):
        parse_inbound("tcp/8080,,udp/53")
    with pytest.raises(ValueError):
        InboundPort("tcp", 70000)


# -- the policy proxy's redirect -----------------------------------------------------------

AGENT = 1000


def proxied(**kw: object) -> FirewallPolicy:
    groups = kw.pop("groups", None) or {
        (443, 80): ["203.0.113.10", "2001:db8::1"],
        (8443,): ["198.51.100.7"],
        (443, 5432): ["198.51.100.8"],
    }
    return pol(groups=groups, agent_uid=AGENT, proxy_port=3129, **kw)


def test_proxy_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="need agent_uid"):
        pol(proxy_port=3129)
    with pytest.raises(ValueError, match="need agent_uid"):
        pol(dns_limit=DnsLimit(LOCAL_DNS, 50, 5000))
    for uid in (0, 101):  # root, the DNS server
        with pytest.raises(ValueError, match="root's or the DNS server's"):
            pol(agent_uid=uid, proxy_port=3129)
    for bad in (True, -1, "1000", 2**32):
        with pytest.raises(ValueError):
            pol(agent_uid=bad)
    for port in (0, 443, 80, 65536, True):
        with pytest.raises(ValueError):
            pol(agent_uid=AGENT, proxy_port=port)
    with pytest.raises(ValueError, match="DnsLimit value"):
        pol(agent_uid=AGENT, dns_limit=(50, 5000))
    assert proxied().redirects and not pol(agent_uid=AGENT).redirects and not pol().redirects


def test_proxy_off_renders_exactly_as_before() -> None:
    """No proxy port and no DNS limit: the agent's uid alone changes no byte."""
    for ipv6 in ("deny", "allowlist", "fly"):
        before = nft.render_apply(pol(ipv6=ipv6))
        assert nft.render_apply(pol(ipv6=ipv6, agent_uid=AGENT)) == before
        assert "to_proxy" not in before and "nat" not in before and "1000" not in before
        for v in (4, 6):
            text = ipt.render_rules(pol(ipv6=ipv6), v)
            assert ipt.render_rules(pol(ipv6=ipv6, agent_uid=AGENT), v) == text
            assert ipt.render_nat(pol(ipv6=ipv6, agent_uid=AGENT), v) == ""
            assert "CODETAINER-DNS" not in text and "--uid-owner 1000" not in text
    assert nft.chains_of(pol()) == nft.CHAINS


def test_nft_redirect_chain() -> None:
    text = nft.render_apply(proxied())
    assert ("add chain inet codetainer to_proxy { type nat hook output priority -100; policy accept; }\n"
            "flush chain inet codetainer to_proxy\n") in text
    redirect = chain(rules_of(text), "to_proxy")
    assert redirect == [
        "meta skuid 1000 tcp dport { 80, 443 } ip daddr @s4_80_443 redirect to :3129",
        # an entry with 443 and a non-HTTP port: 443 goes to the proxy, 5432 stays direct
        "meta skuid 1000 tcp dport 443 ip daddr @s4_443_5432 redirect to :3129",
        "ip daddr { " + ", ".join(model.INTERNAL[4]) + " } return",
        "meta skuid 1000 tcp dport { 80, 443 } ip daddr @d4_80_443 redirect to :3129",
        "meta skuid 1000 tcp dport 443 ip daddr @d4_443_5432 redirect to :3129",
    ]
    assert not any("8443" in r for r in redirect)  # a port of its own: direct, for everyone
    six = chain(rules_of(nft.render_apply(proxied(ipv6="allowlist"))), "to_proxy")
    assert "meta skuid 1000 tcp dport { 80, 443 } ip6 daddr @s6_80_443 redirect to :3129" in six
    assert six.index("ip6 daddr { " + ", ".join(model.INTERNAL[6]) + " } return") < six.index(
        "meta skuid 1000 tcp dport { 80, 443 } ip6 daddr @d6_80_443 redirect to :3129")
    assert "to_proxy" in nft.chains_of(proxied())


def test_nft_filter_side_of_the_redirect() -> None:
    output = chain(rules_of(nft.render_apply(proxied())), "output")
    lo = output.index('oif "lo" accept')
    # the redirected connection keeps its first route's device: accepted by its new address
    dnat4 = output.index("tcp dport 3129 ip daddr 127.0.0.1 ct status dnat accept")
    dnat6 = output.index("tcp dport 3129 ip6 daddr ::1 ct status dnat accept")
    deny = output.index("meta skuid 1000 tcp dport { 80, 443 } goto deny")
    shortcut = output.index("ct direction original ct state established,related accept")
    first_allow = output.index("tcp dport { 80, 443 } ip daddr @s4_80_443 accept")
    assert lo < dnat4 < dnat6 < deny < shortcut < first_allow
    # the allow rules are unchanged: the proxy's uid and root reach allowed addresses
    assert output[first_allow:] == chain(rules_of(nft.render_apply(pol(groups={
        (443, 80): ["203.0.113.10", "2001:db8::1"], (8443,): ["198.51.100.7"],
        (443, 5432): ["198.51.100.8"]}))), "output")[first_allow - 3:]


def test_nft_proxy_off_deletes_the_nat_chain() -> None:
    existing = {"sets": {}, "chains": ["output", "input", "deny", "to_proxy"]}
    assert "delete chain inet codetainer to_proxy" in nft.render_apply(pol(), existing)
    assert "delete chain" not in nft.render_apply(proxied(), existing)


def test_ipt_redirect() -> None:
    nat = ipt.render_nat(proxied(), 4, add_jump=True).splitlines()
    assert nat[:3] == ["*nat", ":CODETAINER-NAT - [0:0]", "-I OUTPUT 1 -j CODETAINER-NAT"]
    assert nat[-1] == "COMMIT"
    to = "-j REDIRECT --to-ports 3129"
    static = (f"-A CODETAINER-NAT -p tcp -m multiport --dports 80,443 -m owner --uid-owner 1000 "
              f"-m set --match-set ct-s4_80_443 dst {to}")
    other = (f"-A CODETAINER-NAT -p tcp --dport 443 -m owner --uid-owner 1000 "
             f"-m set --match-set ct-s4_443_5432 dst {to}")
    internal = "-A CODETAINER-NAT -d 169.254.0.0/16 -j RETURN"
    dynamic = static.replace("ct-s4", "ct-d4")
    assert index(nat, static) < index(nat, other) < index(nat, internal) < index(nat, dynamic)
    assert not any("8443" in line for line in nat)
    assert "-I OUTPUT" not in ipt.render_nat(proxied(), 4)
    assert ipt.render_nat(proxied(), 6) == ""  # IPv6 denied: nothing to redirect
    assert "ct-s6_80_443 dst -j REDIRECT" in ipt.render_nat(proxied(ipv6="allowlist"), 6)
    for v, loopback in ((4, "127.0.0.1"), (6, "::1")):
        out = ipt_chain(ipt.render_rules(proxied(ipv6="allowlist"), v), "CODETAINER-OUT")
        dnat = out.index(f"-d {loopback} -p tcp --dport 3129 -m conntrack --ctstate DNAT -j ACCEPT")
        deny = out.index("-p tcp -m multiport --dports 80,443 -m owner --uid-owner 1000 -j CODETAINER-DENY")
        assert out.index("-o lo -j ACCEPT") < dnat < deny < index(out, "ESTABLISHED") < index(out, "ct-s")


# -- the agent's DNS limits ----------------------------------------------------------------

LOCAL_DNS = ipaddress.ip_address("127.0.0.53")


def limited(server: str = "127.0.0.53", **kw: object) -> FirewallPolicy:
    return pol(agent_uid=AGENT, dns_limit=DnsLimit(ipaddress.ip_address(server), 50, 5000), **kw)


def test_dns_limit_values() -> None:
    limit = DnsLimit(LOCAL_DNS, 50, 5000)
    assert limit.max_name == 100 and limit.port == 53
    # IPv4 + UDP headers, then header 12, name 100 + 2, QTYPE/QCLASS 4, EDNS and a cookie 23
    assert limit.max_length("udp") == 20 + 8 + 12 + 102 + 4 + 23 == 169
    assert limit.max_length("tcp") == 20 + 60 + 2 * (2 + 141) == 366
    assert DnsLimit(ipaddress.ip_address("::1"), 1, 1).max_length("udp") == 189
    for bad in ({"rate": 0}, {"burst": 10_001}, {"max_name": 254}, {"rate": True}, {"port": 0}):
        with pytest.raises(ValueError):
            DnsLimit(LOCAL_DNS, **{"rate": 50, "burst": 5000, **bad})
    with pytest.raises(ValueError):
        DnsLimit("127.0.0.53; drop", 50, 5000)  # type: ignore[arg-type]
    assert parse_dns_rate("50/5000") == (50, 5000) and parse_dns_rate(" 1/1 ") == (1, 1)
    assert parse_dns_rate("off") is None and parse_dns_rate("0") is None
    for bad_text in ("50", "50/", "/5", "a/b", "0/5", "5/0", "10001/5", "5/10001", "-1/5", "５/5"):
        with pytest.raises(ValueError):
            parse_dns_rate(bad_text)
    assert dns_name_bound(["api.github.com"]) == 100
    assert dns_name_bound(["x" * 150 + ".test."]) == 155


def test_nft_dns_limit_rules() -> None:
    output = chain(rules_of(nft.render_apply(limited(dns_hook=("127.0.0.1", 5354)))), "output")
    to = "meta skuid 1000 ip daddr 127.0.0.53"
    rules = [f"{to} udp dport 53 meta length > 169 counter drop",
             f"{to} tcp dport 53 meta length > 366 counter drop",
             f"{to} meta l4proto {{ tcp, udp }} th dport 53 limit rate over 50/second burst 5000 packets "
             "counter drop"]
    at = [output.index(r) for r in rules]
    # after the hook's rule, before the loopback accept (the server is on loopback)
    hook = output.index("meta l4proto { tcp, udp } ip daddr 127.0.0.1 th dport 5354 "
                        "meta skuid != 101 goto deny")
    assert hook < at[0] < at[1] < at[2] < output.index('oif "lo" accept')
    six = "\n".join(rules_of(nft.render_apply(limited("::1"))))
    assert "meta skuid 1000 ip6 daddr ::1 udp dport 53 meta length > 189 counter drop" in six


def test_ipt_dns_limit_chain() -> None:
    lines = ipt.render_rules(limited(), 4).splitlines()
    assert lines[:5] == ["*filter", ":CODETAINER-OUT - [0:0]", ":CODETAINER-IN - [0:0]",
                         ":CODETAINER-DENY - [0:0]", ":CODETAINER-DNS - [0:0]"]
    jumps = [index(lines, f"-A CODETAINER-OUT -d 127.0.0.53 -p {p} --dport 53 -m owner --uid-owner 1000 "
                          "-j CODETAINER-DNS") for p in ("udp", "tcp")]
    assert max(jumps) < index(lines, "-o lo -j ACCEPT")
    assert ipt_chain("\n".join(lines), "CODETAINER-DNS") == [
        "-p udp -m length --length 170:65535 -j DROP",
        "-p tcp -m length --length 367:65535 -j DROP",
        "-m limit --limit 50/second --limit-burst 5000 -j RETURN",
        "-j DROP",
    ]
    assert "CODETAINER-DNS" not in ipt.render_rules(limited(), 6)  # the server is IPv4
    assert "CODETAINER-DNS" in ipt.render_rules(limited("::1"), 6)


def test_the_proxys_uid_shares_the_agents_dns_budget() -> None:
    """The proxy resolves what the agent asks it to reach: same length bound, one budget."""
    limit = DnsLimit(LOCAL_DNS, 50, 5000, also_uids=(998,))
    policy = pol(agent_uid=AGENT, dns_limit=limit)
    output = chain(rules_of(nft.render_apply(policy)), "output")
    to = "meta skuid { 1000, 998 } ip daddr 127.0.0.53"
    assert f"{to} udp dport 53 meta length > 169 counter drop" in output
    assert (f"{to} meta l4proto {{ tcp, udp }} th dport 53 limit rate over 50/second burst 5000 "
            "packets counter drop") in output
    lines = ipt.render_rules(policy, 4).splitlines()
    for uid in (1000, 998):
        for p in ("udp", "tcp"):
            index(lines, f"-A CODETAINER-OUT -d 127.0.0.53 -p {p} --dport 53 -m owner "
                         f"--uid-owner {uid} -j CODETAINER-DNS")
    assert sum("-m limit" in ln for ln in lines) == 1  # one budget for both
    for bad in ((0,), (True,), (-1,)):
        with pytest.raises(ValueError):
            DnsLimit(LOCAL_DNS, 50, 5000, also_uids=bad)  # type: ignore[arg-type]


def test_selftest_redirect_verdicts() -> None:
    def result(redirected: str | None) -> SelfTestResult:
        return SelfTestResult("connected", 1.0, "ECONNREFUSED", 0.2, {}, allowed_target="203.0.113.10:443",
                              redirected=redirected)

    assert result("203.0.113.10:443").ok
    assert result("in use").ok  # the proxy holds the port already: nothing to check
    assert result(None).ok
    for seen, words in (("", "never arrived"), ("203.0.113.11:443", "arrived for 203.0.113.11:443")):
        (problem,) = result(seen).problems()
        assert "not redirected" in problem and words in problem


def test_compose_builds_the_agents_rules(tmp_path: Path) -> None:
    from codetainer.network.allowlist import Allowlist, parse_text
    from codetainer.network.compose import build_policy, make_plan, parse_options
    from codetainer.network.dnsconfig import Engine
    from codetainer.settings import Settings

    def build(**kw: str) -> FirewallPolicy:
        s = Settings(run_dir=str(tmp_path), dns_user="nobody", upstreams="192.0.2.53", agent_user="1000",
                     **kw)
        opts = parse_options(s, Engine.DNSMASQ)
        long_name = "a" * 60 + "." + "b" * 60 + ".test"
        plan = make_plan(Allowlist(tuple(parse_text(f"api.test\n{long_name}\n", "domains.conf"))), opts,
                         "nftables")
        return build_policy(plan, {}, opts)

    on = build(proxy="on")
    assert on.agent_uid == 1000 and on.proxy_port == 3129 and on.redirects
    assert on.dns_limit == DnsLimit(ipaddress.ip_address("127.0.0.53"), 50, 5000, max_name=126)
    off = build(proxy="off", dns_limit="off")
    assert off.agent_uid == 1000 and off.proxy_port is None and off.dns_limit is None
    assert build(proxy="off", dns_limit="5/10").dns_limit == DnsLimit(
        ipaddress.ip_address("127.0.0.53"), 5, 10, max_name=126)
    with pytest.raises(ValueError, match="CODETAINER_DNS_LIMIT"):
        build(dns_limit="lots")
    with pytest.raises(ValueError, match="CODETAINER_PROXY"):
        build(proxy="maybe")
