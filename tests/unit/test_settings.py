"""Typed settings: each CODETAINER_* variable parsed once, a bad one named with its value
and what is accepted (codetainerd exits 64 with that line: tests/integration/test_pid1.py)."""

from __future__ import annotations

import dataclasses

import pytest
from codetainer.settings import MemoryLimit, PluginPlan, Settings, SettingsError, describe


def test_defaults_have_their_types_and_read_as_the_operator_types_them() -> None:
    s = Settings()
    assert (s.proxy, s.readonly_root, s.shutdown_timeout, s.clone_attempts, s.agent_pids) == \
        (True, True, 30.0, 3, 4096)
    assert (s.log_level, s.dns_engine, s.firewall, s.ipv6, s.agent_restart) == \
        ("info", "auto", "auto", "auto", "respawn")
    table = {var: default for var, default, _ in describe()}
    assert table["CODETAINER_PROXY"] == "on" and table["CODETAINER_READONLY_ROOT"] == "1"
    assert table["CODETAINER_SHUTDOWN_TIMEOUT"] == "30" and table["CODETAINER_AGENT_MEMORY"] == "75%"
    # every documented default parses to the field's default
    assert Settings.from_env({var: text for var, text, _ in describe()}) == s


def test_from_env_parses_each_variable_to_its_type() -> None:
    s = Settings.from_env({"CODETAINER_PROXY": "OFF", "CODETAINER_READONLY_ROOT": "no",
                           "CODETAINER_SHUTDOWN_TIMEOUT": " 2.5 ", "CODETAINER_AGENT_NICE": "0",
                           "CODETAINER_DNS_ENGINE": "CoreDNS", "OTHER": "x"}, socket="/tmp/s")
    assert (s.proxy, s.readonly_root, s.shutdown_timeout, s.agent_nice) == (False, False, 2.5, 0)
    assert (s.dns_engine, s.socket) == ("coredns", "/tmp/s")
    assert dataclasses.replace(s, proxy="on").proxy is True  # type: ignore[arg-type]


@pytest.mark.parametrize(("var", "raw", "accepted"), [
    ("CODETAINER_PROXY", "yes", "use one of on, off"),
    ("CODETAINER_LOG_LEVEL", "loud", "use one of debug, info, warning, error"),
    ("CODETAINER_AGENT_RESTART", "sometimes", "use one of respawn, leave"),
    ("CODETAINER_DNS_HEALTH_INTERVAL", "0", "set it to a number of seconds from 0.1 to 3600"),
    ("CODETAINER_CLONE_ATTEMPTS", "2.5", "set it to a number of attempts of at least 1"),
    ("CODETAINER_REFRESH_GRACE", "nan", "set it to a number of seconds of at least 0"),
    ("CODETAINER_REFRESH_MAX_TTL", "900", "set it to a number of seconds from 0.001 to 300"),
    ("CODETAINER_HOME_SIZE", "1g,uid=0", "set it to a tmpfs size: a number with k, m or g "
     "(512m, 1g) or a share of the RAM below 100% (50%)"),
    ("CODETAINER_TMP_SIZE", "100%", "set it to a tmpfs size: a number with k, m or g "
     "(512m, 1g) or a share of the RAM below 100% (50%)"),
    ("CODETAINER_WORKSPACE_SIZE", "", "set it to a tmpfs size: a number with k, m or g "
     "(512m, 1g) or a share of the RAM below 100% (50%)"),
    ("CODETAINER_PLUGINS", "ok@m,--evil", "'--evil' is not a plugin (name@marketplace) or a "
     "marketplace source (owner/repo): use a comma-separated list of those"),
    ("CODETAINER_PLUGINS", "-o/x", "'-o/x' is not a valid marketplace source: use owner/repo, "
     "a URL, a git address or an /absolute/directory"),
    ("CODETAINER_NPM_SCOPES", "@org,@bad/scope", "'@bad/scope' is not an npm scope: use "
     "comma-separated scope names (@my-org,@other)"),
])
def test_a_bad_value_names_the_variable_the_value_and_what_is_accepted(
        var: str, raw: str, accepted: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: raw})
    assert str(err.value) == f"{var}={raw!r} is not valid: {accepted}"
    assert "\n" not in str(err.value)


def test_lists_and_sizes_are_parsed_once_into_what_their_step_uses() -> None:
    s = Settings.from_env({"CODETAINER_PLUGINS": " owner/mkt, tool@mkt,,tool@mkt",
                           "CODETAINER_NPM_SCOPES": "@My-Org, other,",
                           "CODETAINER_AGENT_MEMORY": "2g", "CODETAINER_HOME_SIZE": " 50% "})
    assert s.plugins == PluginPlan(("owner/mkt",), ("tool@mkt",))
    assert s.plugins.commands() == [["plugin", "marketplace", "add", "owner/mkt"],
                                    ["plugin", "install", "tool@mkt"]]
    assert s.npm_scopes == ("@my-org", "@other")
    assert s.agent_memory == MemoryLimit(2 << 30, None)
    assert Settings().agent_memory == MemoryLimit(None, 75)
    assert s.home_size == "50%"
    assert (Settings().plugins, Settings().npm_scopes) == (PluginPlan(), ())


def test_the_refresh_floor_must_not_exceed_the_ceiling() -> None:
    with pytest.raises(SettingsError, match=r"CODETAINER_REFRESH_MIN_TTL='200'.*MAX_TTL=100"):
        Settings.from_env({"CODETAINER_REFRESH_MIN_TTL": "200", "CODETAINER_REFRESH_MAX_TTL": "100"})
