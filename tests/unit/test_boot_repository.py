"""Repository: URL validation, credential helpers, clone retries, fork lookup, snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.boot import repository
from codetainer.boot.repository import CloneError
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize("url", [
    "https://github.com/octo/repo",
    "https://github.com/octo/repo.git",
    "https://github.com/o-c-t-o/re.po_x-1.git",
])
def test_upstream_accepted(url: str) -> None:
    assert repository.validate_upstream(url) == url


@pytest.mark.parametrize("url", [
    "http://github.com/octo/repo",
    "https://github.com.evil.com/octo/repo",
    "https://evil.com/github.com/octo/repo",
    "https://user:pw@github.com/octo/repo",
    "https://github.com/octo/repo/extra",
    "https://github.com/octo",
    "https://github.com/-octo/repo",
    "https://github.com/octo/..",
    "https://github.com/octo/repo.git\n",
    "https://github.com/octo/repo;rm -rf",
    "https://github.com:443/octo/repo",
    "ext::sh -c touch% /tmp/pwned",
])
def test_upstream_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="not a GitHub HTTPS repository URL"):
        repository.validate_upstream(url)


@given(st.text(max_size=80))
def test_upstream_validation_never_accepts_other_hosts(text: str) -> None:
    url = "https://github.com/" + text
    try:
        repository.validate_upstream(url)
    except ValueError:
        return
    owner, repo = text.split("/")
    assert owner and repo and not any(c in text for c in ":@?#\\ \n")


@pytest.mark.parametrize(("url", "slug"), [
    ("https://github.com/o/r.git", ("o", "r")),
    ("https://tok@github.com/o/r", ("o", "r")),
    ("git@github.com:o/r.git", ("o", "r")),
    ("https://gitlab.com/o/r.git", None),
    ("https://github.com/o/r/tree/main", None),
])
def test_github_slug(url: str, slug: tuple[str, str] | None) -> None:
    assert repository.github_slug(url) == slug


def test_parent_url() -> None:
    assert repository.parent_url({"fork": False}) is None
    fork = {"fork": True, "parent": {"clone_url": "https://github.com/up/r.git"}}
    assert repository.parent_url(fork) == "https://github.com/up/r.git"
    by_name = {"fork": True, "parent": {"full_name": "up/r"}}
    assert repository.parent_url(by_name) == "https://github.com/up/r.git"
    with pytest.raises(ValueError):
        repository.parent_url({"fork": True, "parent": {"clone_url": "https://x.y/up/r.git"}})
    with pytest.raises(ValueError):
        repository.parent_url({"fork": True})


def test_clone_env_keeps_secrets_out_of_keys_and_helper_text() -> None:
    env = repository.clone_env({"PATH": "/bin", "GH_PAT": "leak"},
                               [("https://github.com", "x-access-token", "ghp_s3cret")])
    assert "GH_PAT" not in env
    assert [k for k, v in env.items() if v == "ghp_s3cret"] == ["CT_GIT_PASS_0"]
    assert env["GIT_CONFIG_KEY_1"] == "credential.https://github.com.helper"
    assert "ghp_s3cret" not in env["GIT_CONFIG_VALUE_1"]


def test_clone_env_helper_answers_only_its_host() -> None:
    env = repository.clone_env({"PATH": os.environ["PATH"]},
                               [("https://github.com", "x-access-token", "ghp_s3cret")])

    def fill(host: str) -> str:
        return subprocess.run(["git", "credential", "fill"], env=env, capture_output=True,
                              text=True, input=f"protocol=https\nhost={host}\n\n").stdout

    assert "password=ghp_s3cret" in fill("github.com")
    assert "ghp_s3cret" not in fill("gitlab.com")


@pytest.fixture
def bare_repo(tmp_path: Path) -> Path:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    src = tmp_path / "src"
    subprocess.run([*git, "init", "-q", str(src)], check=True)
    (src / "f").write_text("x")
    subprocess.run([*git, "-C", str(src), "add", "."], check=True)
    subprocess.run([*git, "-C", str(src), "commit", "-qm", "c"], check=True)
    bare = tmp_path / "bare.git"
    subprocess.run([*git, "clone", "-q", "--bare", str(src), str(bare)], check=True)
    return bare


async def test_clone_and_snapshot(tmp_path: Path, bare_repo: Path) -> None:
    dest = tmp_path / "repo"
    env = repository.clone_env(os.environ, [])
    used = await repository.clone(f"file://{bare_repo}", dest, env, timeout=30, attempts=2,
                                  backoff=0.01, branch=None, secrets={})
    assert used == 1 and (dest / "f").read_text() == "x"
    await repository.git("remote", "add", "mirror", "https://u:pw@example.com/x.git", cwd=dest)
    remotes = await repository.remote_urls(dest)
    assert remotes == {"origin": {"url": f"file://{bare_repo}"},
                       "mirror": {"url": "https://example.com/x.git"}}
    snap = tmp_path / "run" / "remotes.json"
    repository.write_snapshot(snap, dest, remotes)
    assert json.loads(snap.read_text())["remotes"]["mirror"]["url"] == "https://example.com/x.git"
    assert snap.stat().st_mode & 0o777 == 0o444


async def test_permanent_failure_is_not_retried(tmp_path: Path) -> None:
    with pytest.raises(CloneError) as err:
        await repository.clone(f"file://{tmp_path}/nope.git", tmp_path / "r",
                               repository.clone_env(os.environ, []), timeout=30, attempts=3,
                               backoff=0.01, branch=None, secrets={})
    assert not err.value.retryable
    assert "does not appear to be a git repository" in err.value.message


async def test_transient_failures_are_retried(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    calls: list[int] = []

    async def flaky(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise CloneError("Could not resolve host: github.com", retryable=True)

    monkeypatch.setattr(repository, "clone_once", flaky)
    used = await repository.clone("https://github.com/o/r", tmp_path / "r", {}, timeout=1,
                                  attempts=3, backoff=0.01, branch=None, secrets={})
    assert used == 3 and len(calls) == 3


async def test_clone_error_is_redacted(tmp_path: Path) -> None:
    with pytest.raises(CloneError) as err:
        await repository.clone_once(f"file://{tmp_path}/ghp_zzzzzz9.git", tmp_path / "r",
                                    repository.clone_env(os.environ, []), timeout=30,
                                    branch=None, secrets={"GH_PAT": "ghp_zzzzzz9"})
    assert "ghp_zzzzzz9" not in err.value.message and "[redacted]" in err.value.message


@pytest.fixture
def api() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            body = json.dumps({"fork": True, "parent": {"full_name": "up/r",
                                                        "clone_url": "https://github.com/up/r.git"}})
            if self.path == "/repos/o/garbled":
                body = "<html>not json"
            self.send_response(200 if self.path in ("/repos/o/r", "/repos/o/garbled") else 404)
            self.end_headers()
            self.wfile.write(body.encode())

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    srv.shutdown()
    srv.server_close()


async def test_find_upstream_against_fake_api(api: tuple[str, list[str]]) -> None:
    base, seen = api
    assert await repository.find_upstream(base, "o", "r", "ghp_t", 5) == (
        "https://github.com/up/r.git")
    assert seen == ["Bearer ghp_t"]
    with pytest.raises(OSError, match="HTTP Error 404"):  # logged and skipped by the step
        await repository.find_upstream(base, "o", "missing", "ghp_t", 5)
    with pytest.raises(ValueError):  # a reply that is not JSON
        await repository.find_upstream(base, "o", "garbled", "ghp_t", 5)
    assert seen == ["Bearer ghp_t"] * 3  # the token reached the API: on the child's stdin


async def test_the_api_client_never_has_the_token_in_its_arguments() -> None:
    """The API client (its own interpreter: urllib's HTTPS, ssl and libcrypto stay out of
    the daemon) gets the token on stdin: while it waits for the reply, no process on the
    machine has the token in its command line."""
    token = "ghp_argvcheck" + os.urandom(4).hex()
    seen: list[tuple[str, bool]] = []

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            in_argv = False
            for d in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    in_argv |= token.encode() in (d / "cmdline").read_bytes()
            seen.append((self.headers.get("Authorization", ""), in_argv))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"fork": false}')

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert await repository.find_upstream(
            f"http://127.0.0.1:{srv.server_address[1]}", "o", "r", token, 5) is None
    finally:
        srv.shutdown()
        srv.server_close()
    assert seen == [(f"Bearer {token}", False)]


async def test_find_upstream_times_out() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()  # accepts, never answers
    try:
        with pytest.raises((TimeoutError, OSError)):
            await asyncio.wait_for(repository.find_upstream(
                f"http://127.0.0.1:{s.getsockname()[1]}", "o", "r", "t", 0.3), 5)
    finally:
        s.close()
