"""Boot step ``secrets``: read the tokens once, take them out of the daemon's environment.

``GH_PAT`` and ``CLAUDE_CODE_OAUTH_TOKEN`` must be set and non-empty. They are read
once into ``ctx.secrets`` (plus ``GH_TOKEN``, the name ``gh`` and the agent use), then
removed from ``os.environ`` so no service or helper the daemon starts inherits them,
and their bytes in the process's original environment block are zeroed so
``/proc/<daemon>/environ`` no longer shows them. From then on a secret reaches only
the processes that need it, through their environment or a file, never an argv, a
log line, a status reply or an error message (see :func:`codetainer.log.redact`).

The agent is one of those processes only with the policy proxy off: with it on, what
the agent holds for ``GH_TOKEN`` and ``CLAUDE_CODE_OAUTH_TOKEN`` (``AGENT_SECRETS``) is
decided by ``privileges.agent_secret`` (the proxy's placeholders), and the real values
stay here, for root's clone and the proxy's credentials file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from urllib.parse import unquote, urlsplit, urlunsplit

import structlog

from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.init.environ import scrub_process_environ
from codetainer.log import register_secrets

log = structlog.get_logger("codetainer.boot")

REQUIRED = ("GH_PAT", "CLAUDE_CODE_OAUTH_TOKEN")
#: Also taken out of the daemon's environment: services must not inherit a token.
ALSO_REMOVED = ("GH_TOKEN", "GITHUB_TOKEN", "NODE_AUTH_TOKEN")


def read_secrets(environ: MutableMapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Take the secrets out of ``environ``: (values found, one problem line per bad one)."""
    found: dict[str, str] = {}
    problems: list[str] = []
    for name in REQUIRED:
        raw = environ.pop(name, None)
        if raw is None:
            problems.append(f"{name} is not set")
        elif not raw.strip():
            problems.append(f"{name} is empty")
        else:
            found[name] = raw.strip()
    for name in ALSO_REMOVED:
        environ.pop(name, None)
    return found, problems


def missing_error(problems: list[str], environ: Mapping[str, str]) -> StepError:
    """The operator-facing failure: what is missing and the command that fixes it."""
    app = environ.get("FLY_APP_NAME") or "<app>"
    names = [p.split(" ", 1)[0] for p in problems]
    hint = "; ".join(f"fly secrets set {n}=<value> -a {app}" for n in names)
    return StepError("; ".join(problems), f"run {hint} (or pass it with docker run -e {names[0]})")


def strip_credentials(url: str) -> str:
    """``url`` without user:password (scheme URLs); scp-like ``user@host:path`` is kept."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def url_credentials(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return None
    return unquote(parts.username or ""), unquote(parts.password or "")


async def _run(ctx: BootContext) -> str:
    found, problems = read_secrets(os.environ)
    scrub_process_environ((*REQUIRED, *ALSO_REMOVED))
    if problems:
        raise missing_error(problems, os.environ)
    ctx.secrets.update(found)
    ctx.secrets["GH_TOKEN"] = found["GH_PAT"]
    repo_url = os.environ.get("REPO_URL", "").strip()
    if url_credentials(repo_url):
        # Credentials embedded in REPO_URL are a secret too: services and the agent
        # (REPO_URL is passed through to it) get the stripped URL.
        ctx.secrets["REPO_URL"] = repo_url
        user, password = url_credentials(repo_url) or ("", "")
        register_secrets({k: v for k, v in (("REPO_URL user", user), ("REPO_URL password", password)) if v})
        os.environ["REPO_URL"] = strip_credentials(repo_url)
        scrub_process_environ(("REPO_URL",))
        log.warning("repo_url_credentials_stripped", url=os.environ["REPO_URL"])
    register_secrets(ctx.secrets)  # log lines redact these values from now on
    log.info("secrets_loaded", names=sorted(found))
    return f"{', '.join(REQUIRED)} present"


def secrets_step() -> Step:
    return Step("secrets", _run, timeout=5.0, policy=Policy.FATAL,
                description="read GH_PAT and CLAUDE_CODE_OAUTH_TOKEN once, out of the environment")
