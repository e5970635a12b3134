"""What every agent process is given and started under: its environment with the policy
proxy on and off, and the exec chain's seccomp and core-dump links (rendering only; the
chain runs for real in tests/integration/test_hardening.py)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from codetainer.boot import chain, seccomp
from codetainer.boot.privileges import (
    AGENT_SECRETS,
    PLACEHOLDERS,
    AgentProxy,
    AgentUser,
    ExecLimits,
    agent_env,
    agent_secret,
    setpriv_argv,
)
from codetainer.proxy.model import ANTHROPIC_PLACEHOLDER, GITHUB_PLACEHOLDER, PROXY_PORT

USER = AgentUser("claude", 1000, 1000, "/home/claude")
REAL = {"GH_PAT": "ghp_REALgithub0123", "GH_TOKEN": "ghp_REALgithub0123",
        "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-REALclaude", "CLAUDE_PROMPT": "do it"}
SOURCE = {"LANG": "C.UTF-8", "REPO_URL": "https://github.com/o/r", "GH_PAT": "ghp_daemonenv",
          "NODE_EXTRA_CA_CERTS": "/operator/ca.pem", "HTTPS_PROXY": "http://daemon:1"}


def test_proxy_off_is_todays_environment() -> None:
    env = agent_env(USER, REAL, SOURCE, {"COLORTERM": "truecolor"}, proxy=None)
    assert env["GH_TOKEN"] == REAL["GH_TOKEN"]
    assert env["CLAUDE_CODE_OAUTH_TOKEN"] == REAL["CLAUDE_CODE_OAUTH_TOKEN"]
    assert env["NODE_EXTRA_CA_CERTS"] == "/operator/ca.pem"
    assert env["LANG"] == "C.UTF-8" and env["COLORTERM"] == "truecolor"
    # never the daemon's own variables, whatever they are
    assert "GH_PAT" not in env and "HTTPS_PROXY" not in env and "CLAUDE_PROMPT" not in env


def test_proxy_on_gives_placeholders_and_the_proxy() -> None:
    proxy = AgentProxy("/run/codetainer")
    env = agent_env(USER, REAL, SOURCE, {"COLORTERM": "truecolor"}, proxy=proxy)
    assert env["GH_TOKEN"] == GITHUB_PLACEHOLDER
    assert env["CLAUDE_CODE_OAUTH_TOKEN"] == ANTHROPIC_PLACEHOLDER
    url = f"http://127.0.0.1:{PROXY_PORT}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert env[name] == url, name
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    # the proxy's CA replaces the operator's (that one is for the proxy's upstreams)
    assert env["NODE_EXTRA_CA_CERTS"] == "/run/codetainer/proxy/ca.pem"
    for name in ("SSL_CERT_FILE", "GIT_SSL_CAINFO", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE",
                "NPM_CONFIG_CAFILE"):
        assert env[name] == "/run/codetainer/proxy/ca-bundle.pem", name
    secrets = {REAL["GH_TOKEN"], REAL["CLAUDE_CODE_OAUTH_TOKEN"], SOURCE["GH_PAT"]}
    assert not [k for k, v in env.items() if any(s in v for s in secrets)]
    assert env["COLORTERM"] == "truecolor" and env["REPO_URL"] == SOURCE["REPO_URL"]


def test_a_secret_that_is_not_set_gets_no_placeholder() -> None:
    proxy = AgentProxy("/run/codetainer")
    assert agent_secret("GH_TOKEN", {}, proxy) is None
    env = agent_env(USER, {"GH_TOKEN": "ghp_x"}, {}, proxy=proxy)
    assert env["GH_TOKEN"] == GITHUB_PLACEHOLDER and "CLAUDE_CODE_OAUTH_TOKEN" not in env
    assert set(PLACEHOLDERS) == set(AGENT_SECRETS)


def test_agent_env_needs_the_callers_decision_on_the_proxy() -> None:
    """Keyword-only and without a default: a caller that forgets cannot hand over the
    real tokens by accident (mypy and the call itself refuse it)."""
    with pytest.raises(TypeError):
        agent_env(USER, REAL, SOURCE)  # type: ignore[call-arg]


@pytest.mark.parametrize(("value", "on"), [("on", True), ("ON ", True), ("off", False),
                                           ("", False), (True, True), (None, False)])
def test_proxy_from_settings(value: object, on: bool) -> None:
    proxy = AgentProxy.of(SimpleNamespace(proxy=value, run_dir="/run/x"))
    assert (proxy == AgentProxy("/run/x")) if on else proxy is None
    # before the setting exists: off
    assert AgentProxy.of(SimpleNamespace(run_dir="/run/x")) is None


def test_chain_loads_the_filter_right_after_the_drop_then_the_rlimits() -> None:
    argv = setpriv_argv(USER, ["tmux", "ls"], ExecLimits(1000, 10, 300, ()))
    setpriv = next(i for i, a in enumerate(argv) if a.endswith("setpriv"))
    loader = argv.index("--", setpriv) + 1
    # the C loader, built beside the venv's interpreter by ./dev setup (and the image)
    assert argv[loader] == chain.native_loader() == str(
        Path(sys.executable).with_name("codetainer-seccomp"))
    assert bytes.fromhex(argv[loader + 1]) == seccomp.compile_filter()
    # the loader sets the limits and the nice value itself, then execs the program
    assert argv[loader + 2:] == ["--nproc=300", "--core=0", "--nice=10", "--", "tmux", "ls"]
    assert "--no-new-privs" in argv[setpriv:loader]  # the filter needs it (unprivileged)


def test_the_python_loader_where_the_c_one_is_not_built() -> None:
    hexed = seccomp.filter_hex()
    argv = chain.loader_argv(hexed, ["--nproc=300"], native=False)
    assert argv == [seccomp.python(), "-I", "-S", "-c", seccomp.LOADER, hexed, "--nproc=300", "--"]


def test_filter_rules_and_program() -> None:
    by_name = {r.syscall: r for r in seccomp.RULES}
    assert by_name["unshare"].errno == by_name["clone"].errno == errno.EPERM
    assert by_name["unshare"].flags == by_name["clone"].flags == seccomp.CLONE_NEWUSER
    assert by_name["clone3"].errno == errno.ENOSYS and by_name["clone3"].flags is None
    assert by_name["setns"].errno == errno.EPERM and by_name["setns"].flags is None
    program = seccomp.compile_filter()
    assert program and len(program) % 8 == 0
    # a filter without rules is shorter: the rules are in the program
    assert len(seccomp.compile_filter(())) < len(program)


def test_loader_source_uses_nothing_but_what_python_minus_s_has() -> None:
    compile(seccomp.LOADER, "<loader>", "exec")
    imports = [ln for ln in seccomp.LOADER.splitlines() if ln.startswith(("import", "from"))]
    assert imports == ["import ctypes, os, resource, sys"]
    assert seccomp.python().startswith("/") or seccomp.python() == sys.executable


def test_the_agent_is_pointed_at_the_files_the_proxy_step_writes() -> None:
    from codetainer.proxy import setup

    paths = setup.proxy_dir(SimpleNamespace(run_dir="/run/x"))
    env = AgentProxy("/run/x").env()
    assert env["NODE_EXTRA_CA_CERTS"] == str(paths / setup.CA_FILE)
    assert env["SSL_CERT_FILE"] == str(paths / setup.CA_BUNDLE_FILE)
