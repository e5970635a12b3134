"""``CODETAINER_IPV6=auto``: the evidence that makes a Fly Machine, and the fly rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from codetainer.network import firewall_ipt as ipt
from codetainer.network import firewall_nft as nft
from codetainer.network import flyenv
from codetainer.network.dnsconfig import Engine
from codetainer.network.firewall import FirewallPolicy
from codetainer.network.flyenv import FlyEvidence, choose_ipv6, fly_addresses, parse_ipv6_setting
from codetainer.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ON_FLY = {"FLY_MACHINE_ID": "148e272c1d2e89", "FLY_PRIVATE_IP": "fdaa:0:1:a7b:2::2"}


@pytest.mark.parametrize("raw", ["auto", "deny", "fly", "allowlist", " Fly ", "AUTO"])
def test_every_policy_and_auto_are_accepted(raw: str) -> None:
    assert parse_ipv6_setting(raw) == raw.strip().lower()


@pytest.mark.parametrize("raw", ["", "yes", "on", "fly,deny", "dney"])
def test_a_bad_setting_names_the_variable_and_the_accepted_values(raw: str) -> None:
    with pytest.raises(ValueError, match=re.escape("use one of auto, deny, fly, allowlist")) as exc:
        parse_ipv6_setting(raw)
    assert str(exc.value).startswith("CODETAINER_IPV6=")


def test_auto_is_the_default() -> None:
    assert Settings().ipv6 == "auto"


def test_a_set_policy_is_kept_whatever_the_evidence() -> None:
    on_fly = FlyEvidence(ON_FLY, (("eth0", "fdaa:0:1:a7b:2::2"),))
    for policy in ("deny", "fly", "allowlist"):
        assert choose_ipv6(policy, on_fly) == flyenv.Ipv6Choice(policy, "set by CODETAINER_IPV6")
    assert choose_ipv6("fly").policy == "fly"


def test_auto_is_fly_only_with_both_the_variable_and_a_6pn_address() -> None:
    fly = choose_ipv6("auto", FlyEvidence(ON_FLY, (("eth0", "fdaa:0:1:a7b:2::2"),)))
    assert fly.policy == "fly"
    assert str(fly) == "fly (auto: FLY_MACHINE_ID set, fdaa:0:1:a7b:2::2 on eth0)"
    # Not Fly: no variable (FLY_APP_NAME alone, as the sandbox sets it, is no evidence) ...
    plain = choose_ipv6("auto", FlyEvidence(flyenv.fly_environ({"FLY_APP_NAME": "sandbox"})))
    assert str(plain) == "deny (auto: not a Fly Machine, FLY_MACHINE_ID is not set)"
    assert choose_ipv6("auto") == plain
    # ... the variable but no fdaa::/16 address (an operator's `docker run -e FLY_MACHINE_ID`)
    bare = choose_ipv6("auto", FlyEvidence(ON_FLY, ()))
    assert bare.policy == "deny" and "no fdaa::/16 (6PN) address on any interface" in bare.why
    # ... or interfaces that could not be read: fail closed
    broken = choose_ipv6("auto", FlyEvidence(ON_FLY, error="cannot read the interfaces: EPERM"))
    assert broken.policy == "deny" and "EPERM" in broken.why


def test_only_fdaa_addresses_count_and_fly_private_ip_comes_first() -> None:
    pairs = [("lo", "::1"), ("eth0", "fe80::1"), ("eth0", "2605:4c40:197:7fd0:0:fa4a:e57b:1"),
             ("eth0", "fd00:ce::2"), ("eth1", "fdaa:0:1::9"), ("eth0", "fdaa:0:1:a7b:2::2"),
             ("eth0", "not-an-address"), ("eth0", "172.19.0.2")]
    assert fly_addresses(pairs, "fdaa:0:1:a7b:2::2") == (
        ("eth0", "fdaa:0:1:a7b:2::2"), ("eth1", "fdaa:0:1::9"))
    assert fly_addresses(pairs) == (("eth0", "fdaa:0:1:a7b:2::2"), ("eth1", "fdaa:0:1::9"))


def test_the_netns_is_read_only_when_the_environment_says_fly(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> list[tuple[str, str]]:
        raise AssertionError("netlink read without FLY_MACHINE_ID")

    monkeypatch.setattr(flyenv, "interface_addresses", boom)
    assert flyenv.read_evidence({"FLY_APP_NAME": "x"}) == FlyEvidence({"FLY_APP_NAME": "x"})
    monkeypatch.setattr(flyenv, "interface_addresses", lambda: [("eth0", "fdaa::7")])
    assert flyenv.read_evidence(ON_FLY).addresses == (("eth0", "fdaa::7"),)

    def denied() -> list[tuple[str, str]]:
        raise PermissionError("EPERM")

    monkeypatch.setattr(flyenv, "interface_addresses", denied)
    assert "EPERM" in flyenv.read_evidence(ON_FLY).error


def test_network_options_carry_the_choice_and_its_reason(tmp_path: Path) -> None:
    from codetainer.network.compose import parse_options

    s = Settings(run_dir=str(tmp_path), dns_user="nobody", upstreams="192.0.2.53")
    opts = parse_options(s, Engine.DNSMASQ, FlyEvidence(ON_FLY, (("eth0", "fdaa::7"),)))
    assert (opts.ipv6, opts.ipv6_why) == ("fly", "auto: FLY_MACHINE_ID set, fdaa::7 on eth0")
    assert parse_options(s, Engine.DNSMASQ).ipv6 == "deny"


def test_fly_accepts_packet_too_big_statelessly_and_nothing_from_fly_s_public_range() -> None:
    """Without conntrack a Packet Too Big cannot be related to the SSH flow; dropping it
    would stall large SSH output on a narrower hop. 2605:4c40::/32 carries no SSH."""
    def policy(ipv6: str) -> FirewallPolicy:
        return FirewallPolicy.build({(443,): ["203.0.113.9"]}, dns_uid=101, ipv6=ipv6)

    fly = nft.render_apply(policy("fly"))
    assert "add rule inet codetainer input icmpv6 type packet-too-big accept" in fly
    assert "packet-too-big" not in nft.render_apply(policy("deny"))  # conntrack relates it there
    six = ipt.render_rules(policy("fly"), 6)
    assert "-A CODETAINER-IN -p ipv6-icmp --icmpv6-type packet-too-big -j ACCEPT" in six
    assert "packet-too-big" not in ipt.render_rules(policy("deny"), 6)
    assert "packet-too-big" not in ipt.render_rules(policy("fly"), 4)
    for text in (fly, six):
        assert "2605" not in text


def test_fly_needs_no_ipv6_setting_in_the_app_or_the_launch_commands() -> None:
    assert "CODETAINER_IPV6" not in (ROOT / "fly.toml").read_text()
    readme = (ROOT / "README.md").read_text()
    launch = readme[readme.index("### Launching on Fly.io"):]
    launch = launch[:launch.index("\n## ", 1)]
    assert "fly machine run" in launch and "CODETAINER_IPV6" not in launch
