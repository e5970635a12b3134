"""CODETAINER_INBOUND: parsed once, carried into the firewall policy, shown by status."""

from __future__ import annotations

from pathlib import Path

import pytest
from codetainer.cli.render import render_network
from codetainer.network.allowlist import Allowlist, parse_text
from codetainer.network.compose import build_policy, make_plan, parse_options
from codetainer.network.dnsconfig import Engine
from codetainer.network.firewall import InboundPort
from codetainer.settings import Settings


def settings(tmp: Path, **kw: str) -> Settings:
    return Settings(run_dir=str(tmp / "run"), dns_user="nobody", upstreams="192.0.2.53", **kw)


def test_default_lets_nothing_in(tmp_path: Path) -> None:
    assert Settings().inbound == ""
    opts = parse_options(settings(tmp_path), Engine.DNSMASQ)
    assert opts.inbound == ()


def test_published_ports_reach_the_policy(tmp_path: Path) -> None:
    env = {"CODETAINER_INBOUND": "tcp/8080, udp/5353", "CODETAINER_DNS_USER": "nobody",
           "CODETAINER_RUN_DIR": str(tmp_path), "CODETAINER_UPSTREAMS": "192.0.2.53"}
    opts = parse_options(Settings.from_env(env), Engine.DNSMASQ)
    assert opts.inbound == (InboundPort("tcp", 8080), InboundPort("udp", 5353))
    allow = Allowlist(tuple(parse_text("api.test\n", "domains.conf")))
    policy = build_policy(make_plan(allow, opts, "nftables"), {}, opts)
    assert policy.inbound == opts.inbound
    assert policy.inbound_ports("tcp") == (8080,) and policy.inbound_ports("udp") == (5353,)


@pytest.mark.parametrize(("value", "why"), [
    ("8080", "is not tcp/PORT or udp/PORT"),
    ("8080/tcp", "the protocol comes first"),
    ("tcp/99999", "not in 1-65535"),
    ("tcp/8080;udp/53", "is not tcp/PORT"),
])
def test_a_bad_value_names_the_variable_and_the_form(tmp_path: Path, value: str, why: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_options(settings(tmp_path, inbound=value), Engine.DNSMASQ)
    text = str(err.value)
    assert text.startswith(f"CODETAINER_INBOUND={value!r}: ")
    assert why in text and "comma-separated tcp/PORT or udp/PORT" in text


def test_status_shows_inbound() -> None:
    st = {"active": True, "engine": "coredns", "listen": "127.0.0.53", "hook": None,
          "backend": "nftables", "ipv6": "deny", "names": 1, "addresses": 2}
    assert render_network({**st, "inbound": ""})[0].endswith("IPv6 deny, inbound none")
    first = render_network({**st, "inbound": "tcp/8080,udp/5353"})[0]
    assert first.endswith("IPv6 deny, inbound tcp/8080,udp/5353")
