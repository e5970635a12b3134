"""Boot step ``credentials``: git, gh and npm configured without a token on disk in git's
or npm's config, on a command line or in a log.

- System git config (``/etc/gitconfig``; ``CODETAINER_GIT_CONFIG`` or git's own
  ``GIT_CONFIG_SYSTEM`` moves it): identity from ``GIT_USER_NAME``/``GIT_USER_EMAIL``,
  ``git@github.com:`` rewritten to HTTPS, and the credential helper ``gh auth
  git-credential`` for github.com only.
- ``gh`` for the agent: ``~/.config/gh/hosts.yml`` (0600, owned by the agent, on the
  home tmpfs) holds the token, so ``gh`` (and git through it) works even in a
  subprocess whose ``GH_TOKEN`` was stripped. Exposure: see docs/credentials.md.
- ``~/.npmrc`` for GitHub Packages refers to ``${GH_TOKEN}``, never the token itself.
- Claude Code for the agent's hooks: ``~/.config/codetainer/claude-oauth-token`` (0600,
  the agent's, home tmpfs). Claude Code removes ``CLAUDE_CODE_OAUTH_TOKEN`` from the
  environment of the hooks it runs, so the session namer's own ``claude -p`` was not
  logged in (found with the real CLI); the namer hands this file to it on a file
  descriptor (``CLAUDE_CODE_OAUTH_TOKEN_FILE_DESCRIPTOR``), never in an environment.

With the policy proxy on (``CODETAINER_PROXY=on``) both files hold the proxy's
placeholders (:func:`~codetainer.boot.privileges.agent_secret`), never a real token: git
asks gh, gh answers with the placeholder, and the proxy puts the real token on the
requests its policy allows (docs/credentials.md).
"""


from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.filesystem import write_file
from codetainer.boot.privileges import AgentProxy, agent_secret
from codetainer.settings import Settings, npm_scope

log = structlog.get_logger("codetainer.boot")

#: where the hooks find the Claude Code token (hooks/session_namer.py reads the same path)
CLAUDE_TOKEN_FILE = (".config", "codetainer", "claude-oauth-token")

DEFAULT_GIT_NAME = "Claude"
DEFAULT_GIT_EMAIL = "noreply@anthropic.com"
GITHUB_URL = "https://github.com"
NPM_REGISTRY = "https://npm.pkg.github.com"

#: used when gh is not installed: the same credential, from the environment
ENV_HELPER = ('!f() { test "$1" = get || exit 0; echo username=x-access-token; '
              'echo "password=${GH_TOKEN:-$GITHUB_TOKEN}"; }; f')


def git_quote(value: str, what: str) -> str:
    """A git-config value, double-quoted; newlines and NULs are refused."""
    if any(c in value for c in "\n\r\0"):
        raise StepError(f"{what} contains a line break", f"set {what} to a single line")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def credential_helper(gh: str | None) -> str:
    return f"!{gh} auth git-credential" if gh else ENV_HELPER


def render_gitconfig(name: str, email: str, helper: str, github_url: str = GITHUB_URL) -> str:
    base = github_url.rstrip("/")
    return (
        "# Written by codetainer at boot. Tokens never live here: the credential helper\n"
        "# asks gh, which reads GH_TOKEN or ~/.config/gh/hosts.yml.\n"
        "[user]\n"
        f"\tname = {git_quote(name, 'GIT_USER_NAME')}\n"
        f"\temail = {git_quote(email, 'GIT_USER_EMAIL')}\n"
        f'[url "{base}/"]\n'
        "\tinsteadOf = git@github.com:\n"
        "\tinsteadOf = ssh://git@github.com/\n"
        f'[credential "{base}"]\n'
        "\thelper =\n"
        f"\thelper = {git_quote(helper, 'credential helper')}\n"
        "[init]\n"
        "\tdefaultBranch = main\n"
        "[push]\n"
        "\tautoSetupRemote = true\n"
    )


def render_gh_hosts(token: str, host: str = "github.com") -> str:
    # A JSON string is a valid YAML double-quoted scalar: no value can break the file.
    return (
        f"{host}:\n"
        f"    oauth_token: {json.dumps(token)}\n"
        "    git_protocol: https\n"
    )


def render_npmrc(scopes: Iterable[str]) -> str:
    """``scopes`` as the settings parsed them (CODETAINER_NPM_SCOPES); a scope from
    elsewhere is checked the same way."""
    lines = ["# Written by codetainer at boot. The token comes from the environment."]
    for scope in scopes:
        if not scope.strip():
            continue
        try:
            name = npm_scope(scope)
        except ValueError:
            raise StepError(f"npm scope {scope!r} is not a valid scope name",
                            "fix CODETAINER_NPM_SCOPES (comma-separated, e.g. @my-org)") from None
        lines.append(f"{name}:registry={NPM_REGISTRY}/")
    lines.append(f"//{NPM_REGISTRY.removeprefix('https://')}/:_authToken=${{GH_TOKEN}}")
    return "\n".join(lines) + "\n"


def git_config_path(settings: Settings, environ: Mapping[str, str]) -> Path:
    explicit = settings.git_config or environ.get("CODETAINER_GIT_CONFIG", "")
    return Path(explicit or environ.get("GIT_CONFIG_SYSTEM") or "/etc/gitconfig")


def _own_tree(top: Path, stop: Path, uid: int, gid: int) -> None:
    """chown ``top`` and its parents up to (not including) ``stop``."""
    p = top
    while p != stop and stop in p.parents:
        os.lchown(p, uid, gid)
        p = p.parent


async def _run(ctx: BootContext) -> str:
    settings = ctx.settings
    proxy = AgentProxy.of(settings)
    token = agent_secret("GH_TOKEN", ctx.secrets, proxy)
    if not token:
        raise StepError("no GitHub token in the boot context", "the secrets step must run first")
    user = ctx.agent()
    home = Path(settings.home)

    gh = shutil.which("gh")
    if gh is None:
        log.warning("gh_missing", reason="gh is not installed; git uses GH_TOKEN from the env")
    name = os.environ.get("GIT_USER_NAME") or DEFAULT_GIT_NAME
    email = os.environ.get("GIT_USER_EMAIL") or DEFAULT_GIT_EMAIL
    gitconfig = git_config_path(settings, os.environ)
    write_file(gitconfig, render_gitconfig(name, email, credential_helper(gh)),
           0o644, 0, 0)

    hosts = home / ".config" / "gh" / "hosts.yml"
    write_file(hosts, render_gh_hosts(token), 0o600, user.uid, user.gid)
    _own_tree(hosts.parent, home, user.uid, user.gid)
    os.chmod(hosts.parent, 0o700)

    claude_token = agent_secret("CLAUDE_CODE_OAUTH_TOKEN", ctx.secrets, proxy)
    if claude_token:
        token_file = home.joinpath(*CLAUDE_TOKEN_FILE)
        write_file(token_file, claude_token, 0o600, user.uid, user.gid)
        _own_tree(token_file.parent, home, user.uid, user.gid)
        os.chmod(token_file.parent, 0o700)

    scopes = list(settings.npm_scopes)
    write_file(home / ".npmrc", render_npmrc(scopes), 0o644, user.uid, user.gid)

    log.info("credentials_configured", gitconfig=str(gitconfig), gh=bool(gh),
             git_user=name, npm_scopes=scopes, placeholders=proxy is not None)
    return (f"git {gitconfig} ({'gh' if gh else 'env'} helper), gh hosts.yml, .npmrc"
            + (", claude token for hooks" if claude_token else "")
            + (" (the proxy's placeholders)" if proxy is not None else ""))


def credentials_step() -> Step:
    return Step("credentials", _run, timeout=10.0, policy=Policy.FATAL,
                requires=("secrets", "filesystem"),
                description="git identity and credential helper, gh auth, .npmrc")
