"""git, gh and npm configuration: rendered files, checked with git itself."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from codetainer.boot import credentials
from codetainer.boot.engine import BootContext, StepError
from codetainer.boot.privileges import AgentUser
from codetainer.events import EventBus
from codetainer.proxy.model import ANTHROPIC_PLACEHOLDER, GITHUB_PLACEHOLDER
from codetainer.settings import Settings


def settings(home: Path, proxy: str) -> Any:
    """Settings with CODETAINER_PROXY set explicitly (a plain namespace until the
    setting exists)."""
    base = Settings(home=str(home))
    if "proxy" in {f.name for f in dataclasses.fields(Settings)}:
        return dataclasses.replace(base, proxy=proxy)
    return SimpleNamespace(**dataclasses.asdict(base), proxy=proxy)


def git_config_list(path: Path) -> list[str]:
    out = subprocess.run(["git", "config", "--file", str(path), "--list"], capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


def test_gitconfig_parses_and_scopes_the_helper(tmp_path: Path) -> None:
    f = tmp_path / "gitconfig"
    f.write_text(credentials.render_gitconfig('Ada "the" \\ Coder', "ada@example.com",
                                              credentials.credential_helper("/usr/bin/gh")))
    entries = git_config_list(f)
    assert 'user.name=Ada "the" \\ Coder' in entries
    assert "user.email=ada@example.com" in entries
    assert "url.https://github.com/.insteadof=git@github.com:" in entries
    assert "credential.https://github.com.helper=!/usr/bin/gh auth git-credential" in entries
    assert "credential.https://github.com.helper=" in entries  # resets inherited helpers


def test_env_helper_when_gh_is_missing_serves_the_token(tmp_path: Path) -> None:
    f = tmp_path / "gitconfig"
    f.write_text(credentials.render_gitconfig("a", "b@c", credentials.credential_helper(None)))
    out = subprocess.run(
        ["git", "credential", "fill"], input="protocol=https\nhost=github.com\n\n",
        capture_output=True, text=True, check=True,
        env={"PATH": os.environ["PATH"], "GIT_CONFIG_SYSTEM": str(f),
             "GIT_CONFIG_GLOBAL": "/dev/null", "GH_TOKEN": "ghp_fromenv",
             "GIT_TERMINAL_PROMPT": "0"},
    ).stdout
    assert "username=x-access-token" in out and "password=ghp_fromenv" in out


def test_identity_with_a_newline_is_refused() -> None:
    with pytest.raises(StepError, match="GIT_USER_NAME contains a line break"):
        credentials.render_gitconfig("a\n[core]", "b@c", "x")


def test_gh_hosts_is_valid_and_quoted() -> None:
    text = credentials.render_gh_hosts('ghp_"odd"')
    assert text.splitlines()[0] == "github.com:"
    assert json.loads(text.splitlines()[1].split(": ", 1)[1]) == 'ghp_"odd"'


def test_npmrc_refers_to_the_environment() -> None:
    text = credentials.render_npmrc(["@My-Org", " other "])
    assert "@my-org:registry=https://npm.pkg.github.com/" in text
    assert "@other:registry=https://npm.pkg.github.com/" in text
    assert "//npm.pkg.github.com/:_authToken=${GH_TOKEN}" in text
    with pytest.raises(StepError, match="not a valid scope"):
        credentials.render_npmrc(["@bad/scope"])


def test_git_config_path_precedence() -> None:
    s = Settings()
    assert credentials.git_config_path(s, {}) == Path("/etc/gitconfig")
    assert credentials.git_config_path(s, {"GIT_CONFIG_SYSTEM": "/x"}) == Path("/x")
    assert credentials.git_config_path(
        s, {"GIT_CONFIG_SYSTEM": "/x", "CODETAINER_GIT_CONFIG": "/y"}) == Path("/y")


async def test_step_writes_files_token_only_in_hosts(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CODETAINER_GIT_CONFIG", str(tmp_path / "etc" / "gitconfig"))
    monkeypatch.setenv("GIT_USER_NAME", "Bot")
    monkeypatch.delenv("GIT_USER_EMAIL", raising=False)
    user = AgentUser("me", os.getuid(), os.getgid(), str(home))
    ctx = BootContext(settings(home, "off"), EventBus(), secrets={"GH_TOKEN": "ghp_secret1"},
                      agent_user=user)
    await credentials.credentials_step().run(ctx)
    gitconfig = (tmp_path / "etc" / "gitconfig").read_text()
    assert "ghp_secret1" not in gitconfig
    assert 'name = "Bot"' in gitconfig and f'email = "{credentials.DEFAULT_GIT_EMAIL}"' in gitconfig
    hosts = home / ".config" / "gh" / "hosts.yml"
    assert "ghp_secret1" in hosts.read_text()
    assert stat.S_IMODE(hosts.stat().st_mode) == 0o600
    assert stat.S_IMODE(hosts.parent.stat().st_mode) == 0o700
    npmrc = (home / ".npmrc").read_text()
    assert "ghp_secret1" not in npmrc and "${GH_TOKEN}" in npmrc


async def test_step_leaves_the_claude_token_for_hooks_in_a_private_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claude Code strips its token from its hooks' environment: the session namer's own
    ``claude -p`` reads it from this file (0600 in a 0700 directory, the agent's)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CODETAINER_GIT_CONFIG", str(tmp_path / "etc" / "gitconfig"))
    user = AgentUser("me", os.getuid(), os.getgid(), str(home))
    ctx = BootContext(settings(home, "off"), EventBus(),
                      secrets={"GH_TOKEN": "ghp_x", "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-t"},
                      agent_user=user)
    await credentials.credentials_step().run(ctx)
    token = home.joinpath(*credentials.CLAUDE_TOKEN_FILE)
    assert token.read_text() == "sk-ant-oat01-t"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    for other in (home / ".npmrc", tmp_path / "etc" / "gitconfig"):
        assert "sk-ant-oat01-t" not in other.read_text()


async def test_with_the_proxy_on_every_file_the_agent_reads_holds_placeholders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy holds the tokens: gh's hosts file and the hooks' token file carry the
    placeholders the proxy swaps, and no file the step writes carries a real token."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CODETAINER_GIT_CONFIG", str(tmp_path / "etc" / "gitconfig"))
    user = AgentUser("me", os.getuid(), os.getgid(), str(home))
    real = {"GH_PAT": "ghp_REALgithub0123", "GH_TOKEN": "ghp_REALgithub0123",
            "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-REALclaude"}
    ctx = BootContext(settings(home, "on"), EventBus(), secrets=dict(real),
                      agent_user=user)
    reason = await credentials.credentials_step().run(ctx)
    assert "placeholders" in str(reason)
    hosts = (home / ".config" / "gh" / "hosts.yml").read_text()
    assert f"oauth_token: {json.dumps(GITHUB_PLACEHOLDER)}" in hosts
    assert home.joinpath(*credentials.CLAUDE_TOKEN_FILE).read_text() == ANTHROPIC_PLACEHOLDER
    written = [p for p in (*home.rglob("*"), tmp_path / "etc" / "gitconfig") if p.is_file()]
    assert len(written) == 4, written
    for path in written:
        text = path.read_text()
        assert not any(v in text for v in real.values()), path
    assert ctx.secrets == real  # the real values stay the boot's (root's clone, the proxy)
