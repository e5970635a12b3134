"""Secrets: validation message, removal from the environment, redaction."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from codetainer.boot import secrets
from codetainer.boot.engine import BootContext, StepError
from codetainer.events import EventBus
from codetainer.log import redact
from codetainer.settings import Settings


def test_read_takes_secrets_out_of_the_environment() -> None:
    env = {"GH_PAT": " ghp_x1 \n", "CLAUDE_CODE_OAUTH_TOKEN": "tok", "GH_TOKEN": "old",
           "PATH": "/bin"}
    found, problems = secrets.read_secrets(env)
    assert found == {"GH_PAT": "ghp_x1", "CLAUDE_CODE_OAUTH_TOKEN": "tok"}
    assert problems == []
    assert env == {"PATH": "/bin"}


def test_missing_and_empty_are_each_named_with_the_fix() -> None:
    env = {"GH_PAT": "   ", "FLY_APP_NAME": "my-app"}
    found, problems = secrets.read_secrets(env)
    assert found == {}
    assert problems == ["GH_PAT is empty", "CLAUDE_CODE_OAUTH_TOKEN is not set"]
    err = secrets.missing_error(problems, env)
    assert err.reason == "GH_PAT is empty; CLAUDE_CODE_OAUTH_TOKEN is not set"
    assert err.hint is not None
    assert "fly secrets set GH_PAT=<value> -a my-app" in err.hint
    assert "fly secrets set CLAUDE_CODE_OAUTH_TOKEN=<value> -a my-app" in err.hint


def test_app_placeholder_without_fly_app_name() -> None:
    err = secrets.missing_error(["GH_PAT is not set"], {})
    assert "fly secrets set GH_PAT=<value> -a <app>" in (err.hint or "")


def test_redact() -> None:
    s = {"GH_PAT": "ghp_abcdefgh", "short": "abc"}
    assert redact("token ghp_abcdefgh here; abc", s) == "token [redacted] here; abc"



def test_log_lines_redact_registered_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import structlog
    from codetainer import log

    log.configure("info", "json")
    log.register_secrets({"GH_PAT": "ghp_abcdefgh"})
    try:
        structlog.get_logger("t").info("x", msg="clone failed: ghp_abcdefgh rejected", n=1)
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["msg"] == "clone failed: [redacted] rejected" and line["n"] == 1
    finally:
        log._secrets.clear()
        structlog.reset_defaults()


def test_log_level_toggles_at_run_time(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog
    from codetainer import log

    log.configure("info", "json")
    logger = structlog.get_logger("t")
    logger.debug("hidden")
    assert log.toggle_debug("info") == "debug"
    logger.debug("shown")
    assert log.toggle_debug("info") == "info"
    logger.debug("hidden-again")
    log.set_level("error")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("kept-at-error")  # an exception is an error, not dropped as info
    logger.critical("kept-critical")
    logger.warning("dropped-warning")
    out = capsys.readouterr().out
    structlog.reset_defaults()
    assert "shown" in out and "hidden" not in out
    assert "kept-at-error" in out and "kept-critical" in out and "dropped-warning" not in out


@pytest.mark.parametrize(("url", "clean", "creds"), [
    ("https://user:pw@github.com/o/r.git", "https://github.com/o/r.git", ("user", "pw")),
    ("https://ghp_tok@github.com/o/r", "https://github.com/o/r", ("ghp_tok", "")),
    ("https://u:p%40ss@host:8443/x?y=1", "https://host:8443/x?y=1", ("u", "p@ss")),
    ("https://github.com/o/r.git", "https://github.com/o/r.git", None),
    ("git@github.com:o/r.git", "git@github.com:o/r.git", None),
    ("file:///srv/r.git", "file:///srv/r.git", None),
])
def test_url_credentials(url: str, clean: str, creds: tuple[str, str] | None) -> None:
    assert secrets.strip_credentials(url) == clean
    assert secrets.url_credentials(url) == creds


def test_scrub_zeroes_the_original_environment_block() -> None:
    code = (
        "import os, sys\n"
        "from codetainer.boot.secrets import scrub_process_environ\n"
        "os.environ.pop('CT_UNIT_SECRET')\n"
        "n = scrub_process_environ(['CT_UNIT_SECRET'])\n"
        "env = open('/proc/self/environ', 'rb').read()\n"
        "print(n, b'hunter2-value' in env, b'KEEP=me' in env)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CT_UNIT_SECRET": "hunter2-value", "KEEP": "me"},
                         check=True).stdout.split()
    assert out == ["1", "False", "True"]


async def test_step_fills_context_and_strips_repo_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "scrub_process_environ", lambda names: 0)
    monkeypatch.setenv("GH_PAT", "ghp_1234567")
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "oat_1234567")
    monkeypatch.setenv("REPO_URL", "https://me:pw123456@github.com/o/r.git")
    ctx = BootContext(Settings(), EventBus())
    summary = await secrets.secrets_step().run(ctx)
    assert "present" in (summary or "")
    assert ctx.secrets == {"GH_PAT": "ghp_1234567", "CLAUDE_CODE_OAUTH_TOKEN": "oat_1234567",
                           "GH_TOKEN": "ghp_1234567",
                           "REPO_URL": "https://me:pw123456@github.com/o/r.git"}
    assert "GH_PAT" not in os.environ and "CLAUDE_CODE_OAUTH_TOKEN" not in os.environ
    assert os.environ["REPO_URL"] == "https://github.com/o/r.git"


async def test_step_fails_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "scrub_process_environ", lambda names: 0)
    monkeypatch.delenv("GH_PAT", raising=False)
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "oat_1234567")
    ctx = BootContext(Settings(), EventBus())
    with pytest.raises(StepError) as err:
        await secrets.secrets_step().run(ctx)
    assert err.value.reason == "GH_PAT is not set"
    assert "oat_1234567" not in str(err.value) + (err.value.hint or "")
    assert ctx.secrets == {}
    assert "CLAUDE_CODE_OAUTH_TOKEN" not in os.environ
