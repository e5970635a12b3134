"""The boot steps for real, inside a scratch root (codetainer/sandbox/scratchroot.py).

Each test runs this file as a script inside fresh namespaces: the driver (``__main__``
below) builds a bare repository and a loopback git/API server, runs the named steps
through the real boot engine, then probes the result (mounts, files, modes, what the
agent can do, where the secrets ended up) and writes one JSON report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

GH_PAT = "ghp_TESTSECRETabcdef0123456789"
OAUTH = "sk-ant-oat01-TESTOAUTHsecret987654"
EMBEDDED_PW = "embeddedPW-4242xyz"
ALL_STEPS = "secrets,filesystem,credentials,agent-settings,readonly-root,repository,readiness"

pytestmark = pytest.mark.integration


def boot(tmp_path: Path, steps: str = ALL_STEPS, *, secrets: bool = True,
         env: dict[str, str] | None = None, timeout: float = 90) -> dict[str, Any]:
    from codetainer.sandbox.scratchroot import DEFAULT_ENV, OUT, ScratchRoot

    # the policy proxy off, as before it existed (the driver's agent gets the real tokens)
    full_env = {**DEFAULT_ENV, "FLY_APP_NAME": "myapp", "PYTHONDONTWRITEBYTECODE": "1",
                "CODETAINER_PROXY": "off"}
    if secrets:
        full_env |= {"GH_PAT": GH_PAT, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH}
    full_env |= env or {}
    root = ScratchRoot(tmp_path)
    proc = root.run([sys.executable, str(Path(__file__).resolve()), steps, f"{OUT}/report.json"],
                    env=full_env, timeout=timeout)
    report_file = root.out / "report.json"
    assert proc.returncode == 0 and report_file.exists(), (
        f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    report: dict[str, Any] = json.loads(report_file.read_text())
    report["stderr"] = proc.stderr
    report["stdout"] = proc.stdout
    report["events"] = [json.loads(line) for line in proc.stderr.splitlines()
                        if line.startswith("{")]
    return report


def step(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["steps"] if s["name"] == name)


#: the files that hold a token on purpose (docs/credentials.md)
TOKEN_FILES = {"/home/claude/.config/gh/hosts.yml",
               "/home/claude/.config/codetainer/claude-oauth-token"}


def no_secret_anywhere(report: dict[str, Any], allowed_files: set[str]) -> None:
    for value in (GH_PAT, OAUTH, EMBEDDED_PW):
        assert value not in report["stderr"], "a secret reached a log line"
        assert value not in report["stdout"]
        assert value not in json.dumps(report["steps"]), "a secret reached a step record"
    assert report["cmdline_hits"] == [], "a secret appeared on a command line"
    assert report["server"]["cmdline_hits"] == [], "a secret was on a command line mid-clone"
    assert report["environ_hits"] == [], "a secret stayed in the daemon's environment"
    assert set(report["files_with_secrets"]) <= allowed_files, report["files_with_secrets"]


# --- tests ---------------------------------------------------------------------------------

def test_missing_secrets_fail_with_instructions_and_nothing_mounted(tmp_path: Path) -> None:
    r = boot(tmp_path, secrets=False, env={"GH_PAT": "  "})
    assert r["state"] == "FAILED"
    s = step(r, "secrets")
    assert s["state"] == "FAILED"
    assert "GH_PAT is empty" in s["reason"]
    assert "CLAUDE_CODE_OAUTH_TOKEN is not set" in s["reason"]
    assert "fly secrets set GH_PAT=<value> -a myapp" in s["hint"]
    assert "fly secrets set CLAUDE_CODE_OAUTH_TOKEN=<value> -a myapp" in s["hint"]
    assert all(step(r, n)["state"] == "SKIPPED" for n in ("filesystem", "repository"))
    assert "/workspace" not in r["mounts"]
    assert not r["mounts"]["/"]["readonly"]
    assert r["agent_processes"] == 0


def test_boot_without_repository_is_ready_and_locked_down(tmp_path: Path) -> None:
    r = boot(tmp_path)
    assert r["state"] == "READY", r["reasons"]
    m = r["mounts"]
    assert m["/"]["readonly"]
    assert m["/workspace"] == {"fstype": "tmpfs", "readonly": False, "size": "524288k",
                               "mode": "755", "uid": "1000", "gid": "1000"}
    # tmpfs lists mode only when it differs from its default 1777: stat it instead
    assert m["/tmp"]["fstype"] == "tmpfs" and m["/tmp"]["size"] == "524288k"
    assert r["stat"]["/tmp"] == [0, 0, "1777"]
    assert m["/home/claude"]["size"] == "1048576k"
    assert m["/home/claude"]["uid"] == "1000"
    assert r["writable"] == {"/usr": False, "/etc": False, "/": False, "/opt": False,
                             "/workspace": True, "/tmp": True, "/home/claude": True,
                             "/run/codetainer": True}
    st = r["stat"]
    assert st["/workspace"] == [1000, 1000, "755"]
    assert st["/home/claude"] == [1000, 1000, "750"]
    assert st["/home/claude/.local/bin"] == [1000, 1000, "755"]
    assert st["/home/claude/go/bin"] == [1000, 1000, "755"]
    assert st["/home/claude/.bashrc"] == [1000, 1000, "644"]
    assert st["/home/claude/.config/gh/hosts.yml"] == [1000, 1000, "600"]
    assert st["/home/claude/.config/codetainer/claude-oauth-token"] == [1000, 1000, "600"]
    assert st["/home/claude/.claude.json"] == [1000, 1000, "600"]
    assert st["/etc/gitconfig"] == [0, 0, "644"]
    # links: no binaries in /usr/local/bin here, so every link is skipped with a reason
    assert "skipped links" in step(r, "filesystem")["reason"]
    assert any(e.get("event") == "home_link_skipped" for e in r["events"])
    # file contents
    files = r["files"]
    assert "insteadOf = git@github.com:" in files["/etc/gitconfig"]
    assert "auth git-credential" in files["/etc/gitconfig"]
    assert "_authToken=${GH_TOKEN}" in files["/home/claude/.npmrc"]
    claude_json = json.loads(files["/home/claude/.claude.json"])
    assert claude_json["hasCompletedOnboarding"] is True
    assert claude_json["projects"]["/workspace"]["hasTrustDialogAccepted"] is True
    assert json.loads(files["/home/claude/.claude/settings.json"])
    # the agent: no privilege, and gh/git work with GH_TOKEN stripped
    a = r["agent"]
    assert a["status"]["NoNewPrivs"] == "1"
    assert a["status"]["CapBnd"] == "0000000000000000"
    assert a["status"]["CapEff"] == "0000000000000000"
    assert a["status"]["Uid"].split()[0] == "1000"
    assert a["status"]["Groups"] == ""
    assert a["nft_rc"] != 0
    assert a["remount_rc"] != 0
    assert a["touch_workspace_rc"] == 0
    assert a["touch_etc_rc"] != 0
    assert a["gh_token"] == GH_PAT, "gh must find the token without GH_TOKEN in the env"
    assert f"password={GH_PAT}" in a["git_credential"]
    assert a["git_user"] == "Claude"
    no_secret_anywhere(r, TOKEN_FILES)
    assert r["secret_keys"] == ["CLAUDE_CODE_OAUTH_TOKEN", "GH_PAT", "GH_TOKEN"]


def test_links_made_for_present_binaries(tmp_path: Path) -> None:
    r = boot(tmp_path, "secrets,filesystem",
             env={"CODETAINER_BIN_DIR": "/srv/bin", "FAKE_BINARIES": "claude,bun"})
    assert r["state"] == "READY"
    assert r["links"] == {"/home/claude/.local/bin/claude": "/srv/bin/claude",
                          "/home/claude/.bun/bin/bun": "/srv/bin/bun"}
    assert ".bun/bin/bunx (/srv/bin/bunx is absent)" in step(r, "filesystem")["reason"]


def test_clone_of_private_fork_uses_token_adds_upstream_and_snapshots(tmp_path: Path) -> None:
    r = boot(tmp_path, env={"REPO_URL": "@SERVER@/owner/repo.git"})
    assert r["state"] == "READY", r["reasons"]
    s = step(r, "repository")
    assert "fork of https://github.com/upstream-owner/repo.git" in s["reason"]
    assert r["server"]["auth_ok"] > 0, "the clone must have authenticated with the token"
    assert r["server"]["api_auth_ok"] == 1
    snap = json.loads(r["files"]["/run/codetainer/remotes.json"])
    assert snap["remotes"]["upstream"]["url"] == "https://github.com/upstream-owner/repo.git"
    assert snap["remotes"]["origin"]["url"].endswith("/owner/repo.git")
    assert r["stat"]["/run/codetainer/remotes.json"] == [0, 0, "444"]
    assert r["stat"]["/workspace/repo"][:2] == [1000, 1000]
    assert r["stat"]["/workspace/repo/README.md"][:2] == [1000, 1000]
    assert r["agent"]["repo_log"] == "initial commit"
    claude_json = json.loads(r["files"]["/home/claude/.claude.json"])
    assert claude_json["projects"]["/workspace/repo"]["hasTrustDialogAccepted"] is True
    no_secret_anywhere(r, TOKEN_FILES)


def test_embedded_credentials_are_used_then_stripped(tmp_path: Path) -> None:
    url = f"http://user:{EMBEDDED_PW}@127.0.0.1:@PORT@/emb/repo.git"
    r = boot(tmp_path, env={"REPO_URL": url})
    assert r["state"] == "READY", r["reasons"]
    assert r["server"]["emb_auth_ok"] > 0
    snap = json.loads(r["files"]["/run/codetainer/remotes.json"])
    assert EMBEDDED_PW not in json.dumps(snap)
    assert snap["remotes"]["origin"]["url"].startswith("http://127.0.0.1:")
    assert "repo_url_credentials_stripped" in {e.get("event") for e in r["events"]}
    no_secret_anywhere(r, TOKEN_FILES)


def test_failing_clone_is_degraded_with_reason(tmp_path: Path) -> None:
    r = boot(tmp_path, ALL_STEPS + ",readiness-degraded",
             env={"REPO_URL": "@SERVER@/open/missing.git"})
    assert r["state"] == "DEGRADED"
    s = step(r, "repository")
    assert s["state"] == "DEGRADED"
    assert "clone of http://127.0.0.1:" in s["reason"] and "not found" in s["reason"]
    assert "REPO_URL" in s["hint"]
    assert "repository: REPO_URL is set" in step(r, "readiness-degraded")["reason"]
    assert step(r, "readiness")["state"] == "OK"
    assert r["server"]["requests"]["/open/missing.git"] == 1, "not found must not be retried"
    no_secret_anywhere(r, TOKEN_FILES)


def test_clone_timeouts_are_retried_with_backoff_then_degraded(tmp_path: Path) -> None:
    r = boot(tmp_path, "secrets,filesystem,credentials,repository",
             env={"REPO_URL": "@SERVER@/slow/repo.git", "CODETAINER_CLONE_TIMEOUT": "0.7",
                  "CODETAINER_CLONE_ATTEMPTS": "2", "CODETAINER_CLONE_BACKOFF": "0.1"})
    assert r["state"] == "DEGRADED"
    assert "timed out after 0.7s" in step(r, "repository")["reason"]
    assert [e["attempt"] for e in r["events"] if e.get("event") == "clone_retry"] == [1]
    assert r["server"]["requests"]["/slow/repo.git"] == 2


@pytest.mark.parametrize(("mode", "expect"), [
    ("evil", "upstream lookup skipped (not a GitHub HTTPS repository URL"),
    ("slow", "upstream lookup skipped"),
    ("notfork", "not a fork"),
    ("error", "upstream lookup skipped (HTTP Error 500"),
])
def test_upstream_lookup_failures_are_skipped(tmp_path: Path, mode: str, expect: str) -> None:
    r = boot(tmp_path, "secrets,filesystem,credentials,repository",
             env={"REPO_URL": "@SERVER@/owner/repo.git", "FAKE_API": mode,
                  "CODETAINER_GITHUB_API_TIMEOUT": "0.5"})
    assert r["state"] == "READY", r["reasons"]
    assert expect in step(r, "repository")["reason"]
    assert "upstream" not in json.loads(r["files"]["/run/codetainer/remotes.json"])["remotes"]


# --- the driver (runs inside the scratch root) ---------------------------------------------

def _driver(steps_arg: str, report_path: str) -> None:
    import asyncio
    import base64
    import http.server
    import subprocess
    import threading
    import time

    import structlog

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    from codetainer.boot import (
        agent_settings,
        credentials,
        filesystem,
        readiness,
        repository,
        rootfs,
    )
    from codetainer.boot import secrets as secrets_mod
    from codetainer.boot.engine import BootContext, BootEngine, Step
    from codetainer.boot.privileges import AgentUser, agent_env, setpriv_argv
    from codetainer.events import EventBus
    from codetainer.settings import Settings

    gh_pat = os.environ.get("GH_PAT", "")
    oauth = os.environ.get("CLAUDE_CODE_OAUTH_TOKEN", "")
    secret_values = [v for v in (gh_pat.strip(), oauth.strip(), EMBEDDED_PW) if len(v) > 4]

    def cmdline_hits() -> list[str]:
        hits = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    data = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                hits += [f"{pid}" for v in secret_values if v.encode() in data]
        return hits

    # a bare repository, served over loopback HTTP (dumb protocol) with per-path auth
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    work = Path("/srv/src")
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README.md").write_text("hello\n")
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "initial commit"], check=True)
    for name in ("owner", "emb", "open", "slow"):
        bare = Path(f"/srv/git/{name}/repo.git")
        subprocess.run([*git, "clone", "-q", "--bare", str(work), str(bare)], check=True)
        subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    for b in filter(None, os.environ.get("FAKE_BINARIES", "").split(",")):
        p = Path("/srv/bin", b)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)

    server_state: dict[str, Any] = {"auth_ok": 0, "emb_auth_ok": 0, "api_auth_ok": 0,
                                    "cmdline_hits": [], "requests": {}}
    api_mode = os.environ.get("FAKE_API", "fork")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory="/srv/git", **kw)

        def log_message(self, *args: Any) -> None:
            pass

        def _basic(self) -> tuple[str, str] | None:
            h = self.headers.get("Authorization", "")
            if not h.startswith("Basic "):
                return None
            user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
            return user, pw

        def _deny(self) -> None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            server_state["cmdline_hits"] += cmdline_hits()
            path = self.path.split("?")[0]
            repo = "/".join(path.split("/")[:3])
            if path.endswith("/info/refs"):
                server_state["requests"][repo] = server_state["requests"].get(repo, 0) + 1
            if path.startswith("/api/"):
                if self.headers.get("Authorization") == f"Bearer {gh_pat}":
                    server_state["api_auth_ok"] += 1
                if api_mode == "slow":
                    time.sleep(2)
                if api_mode == "error":
                    self.send_error(500)
                    return
                parent = {"evil": "https://evil.example/x/repo.git"}.get(
                    api_mode, "https://github.com/upstream-owner/repo.git")
                body = json.dumps({"fork": api_mode != "notfork", "full_name": "owner/repo",
                                   "parent": {"full_name": "upstream-owner/repo",
                                              "clone_url": parent}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if path.startswith("/slow/"):
                time.sleep(3)
            if path.startswith("/owner/"):
                if self._basic() != ("x-access-token", gh_pat):
                    self._deny()
                    return
                server_state["auth_ok"] += 1
            if path.startswith("/emb/"):
                if self._basic() != ("user", EMBEDDED_PW):
                    self._deny()
                    return
                server_state["emb_auth_ok"] += 1
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    os.environ["CODETAINER_GITHUB_URL"] = base
    os.environ["CODETAINER_GITHUB_API_URL"] = base + "/api"
    if "REPO_URL" in os.environ:
        os.environ["REPO_URL"] = (os.environ["REPO_URL"].replace("@SERVER@", base)
                                  .replace("@PORT@", str(port)))

    factories: dict[str, Any] = {
        "secrets": secrets_mod.secrets_step,
        "filesystem": filesystem.filesystem_step,
        "credentials": credentials.credentials_step,
        "agent-settings": agent_settings.agent_settings_step,
        "readonly-root": rootfs.rootfs_step,
        "repository": repository.repository_step,
    }
    steps: list[Step] = []
    ready_steps = {s.name: s for s in readiness.readiness_steps()}
    for name in steps_arg.split(","):
        steps += [ready_steps[name]] if name in ready_steps else [factories[name]()]

    class Services:
        def not_running(self) -> list[str]:
            return []

    settings = Settings.from_env()
    # The hooks template may not exist yet in the project: use a fixture when absent.
    if not settings.path("hooks", "settings.template.json").exists():
        fixture = Path("/srv/project/hooks/settings.template.json")
        fixture.parent.mkdir(parents=True)
        fixture.write_text('{"hooks": {"Stop": [{"hooks": [{"type": "command", '
                           '"command": "{{HOOKS_DIR}}/stop"}]}]}}')
        settings = Settings.from_env(root="/srv/project")
    filesystem.ensure_writable_run_dir(settings)
    ctx = BootContext(settings, EventBus(), services=Services())
    engine = BootEngine(steps, ctx)
    state = asyncio.run(engine.run())

    # --- probe --------------------------------------------------------------------------
    report: dict[str, Any] = {"state": state.value, "steps": engine.snapshot(),
                              "reasons": engine.reasons(), "secret_keys": sorted(ctx.secrets),
                              "server": server_state}
    mounts: dict[str, Any] = {}
    for mnt in filesystem.mounts():
        mounts[mnt.mountpoint] = {
            "fstype": mnt.fstype, "readonly": mnt.readonly, "size": mnt.super_option("size"),
            "mode": mnt.super_option("mode"), "uid": mnt.super_option("uid"),
            "gid": mnt.super_option("gid")}
    report["mounts"] = mounts
    report["writable"] = filesystem.writable(
        ["/usr", "/etc", "/", "/opt", "/workspace", "/tmp", "/home/claude", "/run/codetainer"])
    watched = ["/tmp", "/workspace", "/home/claude", "/home/claude/.local/bin",
               "/home/claude/go/bin", "/home/claude/.bashrc",
               "/home/claude/.config/gh/hosts.yml", "/home/claude/.claude.json",
               "/home/claude/.config/codetainer/claude-oauth-token",
               "/etc/gitconfig", "/run/codetainer/remotes.json", "/workspace/repo",
               "/workspace/repo/README.md"]
    report["stat"] = {p: [os.lstat(p).st_uid, os.lstat(p).st_gid,
                          f"{os.lstat(p).st_mode & 0o7777:o}"]
                      for p in watched if os.path.lexists(p)}
    report["files"] = {p: Path(p).read_text() for p in
                       ["/etc/gitconfig", "/home/claude/.npmrc", "/home/claude/.claude.json",
                        "/home/claude/.claude/settings.json", "/run/codetainer/remotes.json"]
                       if os.path.exists(p)}
    report["links"] = {str(p): os.readlink(p) for p in Path("/home/claude").rglob("*")
                       if p.is_symlink()}
    report["agent_processes"] = 0
    agent: dict[str, Any] = {}
    if state.value != "FAILED":
        user = AgentUser.lookup("claude")
        env = agent_env(user, ctx.secrets, os.environ, proxy=None)
        stripped = {k: v for k, v in env.items() if k not in ("GH_TOKEN", "GITHUB_TOKEN")}

        def as_agent(*argv: str, strip: bool = False, stdin: str | None = None,
                     cwd: str = "/workspace") -> subprocess.CompletedProcess[str]:
            report["agent_processes"] += 1
            return subprocess.run(setpriv_argv(user, list(argv)), env=stripped if strip else env,
                                  capture_output=True, text=True, input=stdin, cwd=cwd,
                                  check=False)

        status = as_agent("cat", "/proc/self/status").stdout
        agent["status"] = {k: v.strip() for k, _, v in
                           (line.partition(":") for line in status.splitlines())}
        agent["nft_rc"] = as_agent("nft", "add", "table", "inet", "agent_was_here").returncode
        agent["remount_rc"] = as_agent("mount", "-o", "remount,rw", "/").returncode
        agent["touch_workspace_rc"] = as_agent("touch", "/workspace/agent-file").returncode
        agent["touch_etc_rc"] = as_agent("touch", "/etc/agent-file").returncode
        agent["gh_token"] = as_agent("gh", "auth", "token", strip=True).stdout.strip()
        agent["git_credential"] = as_agent(
            "git", "credential", "fill", strip=True,
            stdin="protocol=https\nhost=github.com\n\n").stdout
        agent["git_user"] = as_agent("git", "config", "user.name").stdout.strip()
        if os.path.isdir("/workspace/repo"):
            agent["repo_log"] = as_agent("git", "log", "--format=%s", "-1",
                                         cwd="/workspace/repo").stdout.strip()
        # never keep the agent's own outputs in the report: they legitimately hold tokens
        agent["gh_token"] = GH_PAT if agent["gh_token"] == gh_pat.strip() else "wrong"
        agent["git_credential"] = agent["git_credential"].replace(gh_pat.strip(), GH_PAT)
    report["agent"] = agent
    report["cmdline_hits"] = cmdline_hits()
    environ = Path("/proc/self/environ").read_bytes()
    report["environ_hits"] = [v[:4] for v in secret_values if v.encode() in environ]
    hits = []
    # not the project's own tree nor the venv, wherever the checkout lives (these hold the
    # test's literal fake secrets, this very file among them)
    project = str(Path(__file__).resolve().parents[2])
    skip = ("/proc", "/sys", "/dev", "/usr", "/work", "/opt", "/scratch-out", "/srv",
            project, sys.prefix)
    for dirpath, dirnames, filenames in os.walk("/"):
        if dirpath.startswith(skip) and dirpath != "/":
            dirnames[:] = []
            continue
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            try:
                data = Path(p).read_bytes() if os.path.isfile(p) else b""
            except OSError:
                continue
            if any(v.encode() in data for v in secret_values):
                hits.append(p)
    report["files_with_secrets"] = hits
    httpd.shutdown()
    Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2])
