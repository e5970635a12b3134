"""Boot step ``repository`` (degraded): clone ``REPO_URL`` into ``<workspace>/repo``.

- ``git clone`` with a per-attempt timeout and retries with exponential backoff
  (tenacity); errors that retrying cannot fix (not found, authentication) stop at once.
- Credentials never touch argv: the GitHub token (and any user:password embedded in
  ``REPO_URL``, which is stripped from the URL) reach git through a credential helper
  that reads them from the environment of the clone process only, scoped to the host
  they belong to. Messages built from git's output are redacted.
- When the repository is a GitHub fork, an ``upstream`` remote is added; the parent is
  looked up with the GitHub API (base URL configurable, timeout; a failed lookup is
  logged and skipped) and must be a strict ``https://github.com/<owner>/<repo>(.git)``.
- Every remote URL, credentials stripped, is snapshot into a root-owned read-only file
  (``<run_dir>/remotes.json``), then the tree is handed to the agent (chown -R).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from codetainer import httpget, runner
from codetainer.backoff import exponential
from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.filesystem import write_file
from codetainer.boot.privileges import AgentUser
from codetainer.boot.secrets import strip_credentials, url_credentials
from codetainer.log import redact
from codetainer.settings import Settings

log = structlog.get_logger("codetainer.boot")

GITHUB_URL = "https://github.com"
#: matched with fullmatch (``$`` would accept a trailing newline)
UPSTREAM_RE = re.compile(
    r"https://github\.com/[A-Za-z0-9][A-Za-z0-9-]{0,38}/"
    r"(?!\.+(?:\.git)?\Z)[A-Za-z0-9._-]{1,100}?(?:\.git)?"
)
FULL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/(?!\.+\Z)[A-Za-z0-9._-]{1,100}")
#: git errors that another attempt cannot fix
PERMANENT = re.compile(
    r"not found|does not appear to be a git repository|does not exist|Authentication failed|"
    r"could not read (Username|Password)|Permission denied|Invalid username or password|"
    r"returned error: 40[134]",
    re.IGNORECASE,
)
#: seconds for a local git command (config, remote add) and for the hand-over's chown -R
GIT_TIMEOUT = 30.0
HAND_OVER_TIMEOUT = 120.0
HELPER = ('!f() {{ test "$1" = get || exit 0; '
          'printf "%s\\n" "username=${{CT_GIT_USER_{i}}}" "password=${{CT_GIT_PASS_{i}}}"; }}; f')


class CloneError(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


# --- URLs -------------------------------------------------------------------------------

def validate_upstream(url: str) -> str:
    """``url`` if it is exactly ``https://github.com/<owner>/<repo>(.git)``; else ValueError."""
    if not UPSTREAM_RE.fullmatch(url):
        raise ValueError(f"not a GitHub HTTPS repository URL: {url!r}")
    return url


def github_slug(url: str, github_url: str = GITHUB_URL) -> tuple[str, str] | None:
    """(owner, repo) when ``url`` names a repository on GitHub (HTTPS or git@ form)."""
    url = strip_credentials(url)
    base = re.escape(github_url.rstrip("/"))
    m = re.match(base + r"/([^/]+)/([^/]+?)(?:\.git)?/?$", url) or re.match(
        r"^(?:ssh://)?git@github\.com[:/]([^/]+)/([^/]+?)(?:\.git)?/?$", url)
    if not m or not FULL_NAME_RE.fullmatch(f"{m.group(1)}/{m.group(2)}"):
        return None
    return m.group(1), m.group(2)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


# --- clone ------------------------------------------------------------------------------

def clone_env(base: Mapping[str, str], creds: list[tuple[str, str, str]],
              github_url: str = GITHUB_URL) -> dict[str, str]:
    """Environment for ``git clone``: credentials via env-reading helpers, scoped per URL.

    ``creds`` is a list of (url prefix, username, password).
    """
    env = {k: v for k, v in base.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "HOME")}
    env.update({
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ASKPASS": "/bin/false",
        "SSH_ASKPASS": "/bin/false",
    })
    config = [(f"url.{github_url.rstrip('/')}/.insteadOf", "git@github.com:")]
    for i, (prefix, user, password) in enumerate(creds):
        config.append((f"credential.{prefix}.helper", HELPER.format(i=i)))
        env[f"CT_GIT_USER_{i}"] = user
        env[f"CT_GIT_PASS_{i}"] = password
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for i, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


async def clone_once(url: str, dest: Path, env: Mapping[str, str], *, timeout: float,
                     branch: str | None, secrets: Mapping[str, str]) -> None:
    if dest.exists():
        shutil.rmtree(dest)  # a partial tree from an earlier attempt
    argv = ["git", "clone", "--quiet"]
    if branch:
        argv += ["--branch", branch]
    argv += ["--", url, str(dest)]
    try:
        # git forks helpers (remote-https, credential helper): the runner kills the group
        done = await runner.run(argv, timeout=timeout, env=env)
    except runner.SpawnError as exc:
        raise CloneError(str(exc), retryable=False) from None
    if done.timed_out:
        raise CloneError(f"git clone timed out after {timeout:g}s", retryable=True)
    if done.code != 0:
        text = done.stderr
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # git's first "fatal:" line says what went wrong; the rest is advice
        first = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))),
                     lines[-1] if lines else f"exit status {done.code}")
        detail = redact(first, secrets)
        detail = re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"]+",
                        lambda m: strip_credentials(m.group(0)), detail)
        raise CloneError(detail, retryable=not PERMANENT.search(text))


async def clone(url: str, dest: Path, env: Mapping[str, str], *, timeout: float,
                attempts: int, backoff: float, branch: str | None,
                secrets: Mapping[str, str]) -> int:
    """Clone with retries; returns the number of attempts used, raises CloneError."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("clone_retry", attempt=state.attempt_number,
                    reason=exc.message if isinstance(exc, CloneError) else str(exc),
                    sleep_s=round(state.next_action.sleep if state.next_action else 0, 2))

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=exponential(backoff, 30.0),
        retry=retry_if_exception(lambda e: isinstance(e, CloneError) and e.retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    used = 0
    async for attempt in retrying:
        with attempt:
            used = attempt.retry_state.attempt_number
            await clone_once(url, dest, env, timeout=timeout, branch=branch, secrets=secrets)
    return used


# --- fork / upstream --------------------------------------------------------------------

async def api_get(url: str, token: str, timeout: float) -> Any:
    """GET a GitHub API URL with ``token`` (:mod:`codetainer.httpget`: in its own
    interpreter, the token on its stdin): the decoded JSON. OSError (unreachable, an HTTP
    error with its code), TimeoutError, or ValueError (the reply is not JSON)."""
    body = await httpget.get(url, timeout=timeout, token=token, headers={
        "Accept": "application/vnd.github+json", "User-Agent": "codetainer",
        "X-GitHub-Api-Version": "2022-11-28"})
    return json.loads(body)


def parent_url(repo_info: Any) -> str | None:
    """The fork's parent as a validated GitHub HTTPS URL, or None if not a fork."""
    if not isinstance(repo_info, dict) or not repo_info.get("fork"):
        return None
    parent = repo_info.get("parent")
    if not isinstance(parent, dict):
        raise ValueError("fork without a parent in the API reply")
    clone_url = parent.get("clone_url")
    if isinstance(clone_url, str):
        return validate_upstream(clone_url)
    full_name = parent.get("full_name")
    if isinstance(full_name, str) and FULL_NAME_RE.fullmatch(full_name):
        return validate_upstream(f"https://github.com/{full_name}.git")
    raise ValueError("fork parent has no usable clone_url or full_name")


async def find_upstream(api_base: str, owner: str, repo: str, token: str,
                        timeout: float) -> str | None:
    url = f"{api_base.rstrip('/')}/repos/{owner}/{repo}"
    info = await api_get(url, token, timeout)
    return parent_url(info)


async def git(*args: str, cwd: Path | None = None) -> str:
    """A local git command (config, remote): its stdout; CloneError when it fails."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null"}
    try:
        done = await runner.run(["git", *args], timeout=GIT_TIMEOUT, env=env,
                                cwd=str(cwd) if cwd is not None else None)
    except runner.SpawnError as exc:
        raise CloneError(f"git {args[0]}: {exc}", False) from None
    if not done.ok:
        why = done.stderr.strip() if not done.timed_out else done.outcome
        raise CloneError(f"git {args[0]}: {why}", False)
    return done.stdout


# --- snapshot ---------------------------------------------------------------------------

async def remote_urls(repo: Path) -> dict[str, dict[str, str]]:
    """{remote: {"url": ..., "pushurl": ...}}, credentials stripped; read from the config
    file directly, so nothing in the repository runs."""
    try:
        out = await git("config", "--file", str(repo / ".git" / "config"),
                        "--get-regexp", r"^remote\..*\.(url|pushurl)$")
    except CloneError:
        return {}  # no remotes: git config exits 1
    remotes: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        name, _, kind = key.removeprefix("remote.").rpartition(".")
        remotes.setdefault(name, {})[kind] = strip_credentials(value)
    return remotes


def write_snapshot(path: Path, repo: Path, remotes: dict[str, dict[str, str]]) -> None:
    data = {"repository": str(repo), "remotes": remotes}
    write_file(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o444, 0, 0)


# --- the step ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RepoOptions:
    attempts: int
    backoff: float
    clone_timeout: float
    api_base: str
    api_timeout: float
    github_url: str

    @classmethod
    def of(cls, settings: Settings) -> RepoOptions:
        """From the typed settings (checked when they were parsed)."""
        return cls(
            attempts=max(1, settings.clone_attempts),
            backoff=settings.clone_backoff,
            clone_timeout=settings.clone_timeout,
            api_base=settings.github_api_url,
            api_timeout=settings.github_api_timeout,
            github_url=settings.github_url,
        )


async def _add_upstream(repo: Path, url: str, o: RepoOptions, token: str) -> str:
    slug = github_slug(url, o.github_url)
    if slug is None:
        return "not a GitHub repository: no upstream lookup"
    try:
        upstream = await find_upstream(o.api_base, *slug, token, o.api_timeout)
    except (OSError, TimeoutError, ValueError) as exc:  # urllib's URLError is an OSError
        reason = redact(str(exc) or type(exc).__name__, {"t": token})
        log.warning("upstream_lookup_skipped", repo="/".join(slug), reason=reason)
        return f"upstream lookup skipped ({reason})"
    if upstream is None:
        return "not a fork"
    await git("remote", "add", "upstream", upstream, cwd=repo)
    log.info("upstream_added", repo="/".join(slug), upstream=upstream)
    return f"fork of {upstream}"


async def hand_over(dest: Path, user: AgentUser) -> None:
    """Give the checkout to the agent. The tree came from a remote the agent may steer
    (a symlink to /etc/shadow committed in it): ``-R`` with ``--no-dereference`` changes
    each link itself and never walks or changes what it points at. Runs before any agent
    code does (docs/security.md)."""
    argv = ["chown", "-R", "--no-dereference", f"{user.uid}:{user.gid}", str(dest)]
    try:
        done = await runner.run(argv, timeout=HAND_OVER_TIMEOUT)
    except runner.SpawnError as exc:
        raise StepError(f"cannot hand {dest} to {user.name} ({exc})") from None
    if not done.ok:
        why = done.stderr.strip()[:500] if not done.timed_out else done.outcome
        raise StepError(f"cannot hand {dest} to {user.name} (chown failed: {why or done.exit})")


async def _run(ctx: BootContext) -> str:
    s = ctx.settings
    # the secrets step keeps a REPO_URL with credentials here and strips the env copy
    repo_url = ctx.secrets.get("REPO_URL") or os.environ.get("REPO_URL", "").strip()
    if not repo_url:
        return "REPO_URL not set: nothing to clone"
    o = RepoOptions.of(s)
    dest = Path(s.workspace, "repo")
    token = ctx.secrets.get("GH_TOKEN", "")
    clean_url = strip_credentials(repo_url)
    creds: list[tuple[str, str, str]] = []
    embedded = url_credentials(repo_url)
    if embedded:
        creds.append((_origin(repo_url), *embedded))
    if token:
        creds.append((o.github_url.rstrip("/"), "x-access-token", token))
    secrets = {**ctx.secrets, **({"embedded": embedded[1]} if embedded else {})}
    env = clone_env(os.environ, creds, o.github_url)
    branch = os.environ.get("REPO_BRANCH") or None
    try:
        used = await clone(clean_url, dest, env, timeout=o.clone_timeout, attempts=o.attempts,
                           backoff=o.backoff, branch=branch, secrets=secrets)
    except CloneError as exc:
        log.warning("clone_failed", url=clean_url, reason=exc.message)
        shutil.rmtree(dest, ignore_errors=True)
        raise StepError(f"clone of {clean_url} failed: {exc.message}",
                        "check REPO_URL and that GH_PAT can read the repository; "
                        "the agent starts in the empty workspace") from None
    upstream = await _add_upstream(dest, clean_url, o, token)
    remotes = await remote_urls(dest)
    snapshot = Path(s.run_dir, "remotes.json")
    write_snapshot(snapshot, dest, remotes)
    await hand_over(dest, ctx.agent())
    log.info("repository_ready", path=str(dest), url=clean_url, attempts=used,
             remotes=sorted(remotes), snapshot=str(snapshot))
    return f"cloned {clean_url} into {dest} ({used} attempt{'s' if used > 1 else ''}); {upstream}"


def repository_step(settings: Settings | None = None) -> Step:
    """``settings`` sizes the step's timeout to the retry budget (defaults if None)."""
    budget = 3 * (300 + 30.0)
    if settings is not None:
        o = RepoOptions.of(settings)
        budget = o.attempts * (o.clone_timeout + min(30.0, o.backoff * 8)) + o.api_timeout
    return Step("repository", _run, timeout=budget + 30, policy=Policy.DEGRADED,
                requires=("secrets", "filesystem"),
                description="clone REPO_URL, add upstream for forks, snapshot remotes")
