"""The agent's tools work through the policy proxy: one request each, in one full boot.

codetainerd boots with ``CODETAINER_PROXY=on`` in a world of stand-ins (codetainer/sandbox/standins.py:
GitHub, npm, PyPI, Anthropic's API, each under its real name). Each tool runs in the
agent's own shell pane, with the environment the daemon gave it (proxy variables, the
proxy's CA, placeholders instead of tokens), and its request is checked where it
arrived: at the stand-in, with the real token where the preset adds one, and with no
credential where it does not.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from codetainer.proxy.model import ANTHROPIC_PLACEHOLDER, GITHUB_PLACEHOLDER, PROXY_PORT
from codetainer.sandbox.fullboot import ProxyMachine, proxy_machine
from codetainer.sandbox.standins import (
    ATTACKER_REPO,
    MODULE_VALUE,
    NODE_VALUE,
    OWNER_REPO,
    PACKAGE,
    README,
    WHEEL,
)

pytestmark = pytest.mark.integration

PROXY = f"http://127.0.0.1:{PROXY_PORT}"


@pytest.fixture(scope="module")
def m() -> Iterator[ProxyMachine]:
    if shutil.which("claude") is None:
        pytest.fail("the Claude Code CLI is not installed: run ./dev setup")
    with proxy_machine("ct-tools-") as pm:
        yield pm


def since(m: ProxyMachine, n: int, **match: Any) -> list[dict[str, Any]]:
    """The stand-ins' records after the first ``n`` whose fields equal ``match``."""
    return [r for r in m.standins.requests()[n:] if all(r.get(k) == v for k, v in match.items())]


def test_the_agent_environment_points_at_the_proxy(m: ProxyMachine) -> None:
    r = m.agent("env")
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert env.get(var) == PROXY, (var, env.get(var))
    assert "127.0.0.1" in env.get("NO_PROXY", "") and "localhost" in env.get("no_proxy", "")
    assert env["NODE_EXTRA_CA_CERTS"] == "/run/codetainer/proxy/ca.pem"
    for var in ("SSL_CERT_FILE", "GIT_SSL_CAINFO", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE",
                "NPM_CONFIG_CAFILE"):
        assert env.get(var) == "/run/codetainer/proxy/ca-bundle.pem", (var, env.get(var))
    assert env["GH_TOKEN"] == GITHUB_PLACEHOLDER
    assert env["CLAUDE_CODE_OAUTH_TOKEN"] == ANTHROPIC_PLACEHOLDER


def test_claude_code_answers_through_the_proxy_with_the_real_token(m: ProxyMachine) -> None:
    """The real CLI with a placeholder token: the proxy puts the operator's in."""
    before = len(m.standins.api_requests())
    r = m.agent("claude -p hello", timeout=90)
    assert r.returncode == 0 and "STANDIN-REPLY: hello" in r.stdout, r
    asks = [q for q in m.standins.api_requests()[before:]
            if q["method"] == "POST" and q["path"].split("?")[0] == "/v1/messages"]
    assert asks and all(q["token"] == "real" and q["auth"] == "bearer" for q in asks), asks
    assert all(q["sni"] == "api.anthropic.com" for q in asks), asks


def test_git_clone_and_fetch_of_the_repository(m: ProxyMachine) -> None:
    n = len(m.standins.requests())
    r = m.agent("rm -rf /tmp/clone && git clone -q https://github.com/owner/repo.git /tmp/clone "
                "&& cat /tmp/clone/README.md && git -C /tmp/clone fetch -q origin && echo fetched",
                timeout=90)
    assert r.returncode == 0 and r.stdout == README + "fetched\n", r
    packs = since(m, n, repo=OWNER_REPO, method="POST")
    assert packs and all(p["token"] == "real" and p["user"] == "x-access-token" for p in packs), \
        packs


def test_gh_api_and_repo_view(m: ProxyMachine) -> None:
    n = len(m.standins.requests())
    r = m.agent(f"gh api /repos/{OWNER_REPO}")
    assert r.returncode == 0 and json.loads(r.stdout)["full_name"] == OWNER_REPO, r
    r = m.agent(f"gh repo view {OWNER_REPO}")
    assert r.returncode == 0 and README.strip() in r.stdout, r
    got = since(m, n, host="api.github.com")
    assert {g["path"].split("?")[0] for g in got} >= {f"/repos/{OWNER_REPO}", "/graphql",
                                                     f"/repos/{OWNER_REPO}/readme"}, got
    assert all(g["token"] == "real" for g in got), got


def test_curl_reads_a_public_repository_without_the_token(m: ProxyMachine) -> None:
    """A read of another repository goes through, and the proxy adds no credential."""
    n = len(m.standins.requests())
    r = m.agent(f"curl -sS --fail https://api.github.com/repos/{ATTACKER_REPO}")
    assert r.returncode == 0 and json.loads(r.stdout)["full_name"] == ATTACKER_REPO, r
    got = since(m, n, path=f"/repos/{ATTACKER_REPO}")
    assert got and got[-1]["token"] is None and got[-1]["ua"].startswith("curl/"), got


def test_npm_install(m: ProxyMachine) -> None:
    n = len(m.standins.requests())
    r = m.agent(f"rm -rf /tmp/npmi && mkdir /tmp/npmi && cd /tmp/npmi && npm install "
                f"--no-audit --no-fund --fetch-retries=0 {PACKAGE} >/dev/null && "
                f"node -e 'console.log(require(\"{PACKAGE}\"))'", timeout=90)
    assert r.returncode == 0 and r.stdout.strip() == NODE_VALUE, r
    got = since(m, n, host="registry.npmjs.org")
    assert {g["path"] for g in got} >= {f"/{PACKAGE}"}, got
    assert any(g["path"].endswith(".tgz") for g in got), got


def test_pip_download_and_install(m: ProxyMachine) -> None:
    n = len(m.standins.requests())
    r = m.agent(f"rm -rf /tmp/pd /tmp/pt && python3 -m pip download -q --no-deps "
                f"--disable-pip-version-check -d /tmp/pd {PACKAGE} && ls /tmp/pd && "
                f"python3 -m pip install -q --disable-pip-version-check --target /tmp/pt "
                f"{PACKAGE} && PYTHONPATH=/tmp/pt python3 -c 'import ct_tiny; print(ct_tiny.VALUE)'",
                timeout=90)
    assert r.returncode == 0 and r.stdout.split() == [WHEEL, MODULE_VALUE], r
    hosts = {g["host"] for g in since(m, n, site="pypi.org")}
    assert hosts == {"pypi.org", "files.pythonhosted.org"}, hosts
