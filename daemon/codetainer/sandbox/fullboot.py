"""The whole codetainer, booted for real: test world + scratch root + codetainerd as PID 1.

Shared by the end-to-end tests, the boot benchmark and ``./dev sandbox``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codetainer.control.client import Client, DaemonUnreachable
from codetainer.network.allowlist import load_allowlist
from codetainer.sandbox.daemonproc import log_events, wait_for
from codetainer.sandbox.scratchroot import DEFAULT_ENV, OUT, ScratchRoot, Spawned
from codetainer.sandbox.standins import StandIns
from codetainer.sandbox.world import ALLOWED_HOSTS, API_HOST, PYTHON, UPSTREAM, World

ROOT = Path(__file__).resolve().parents[3]
CODETAINERD = str(Path(sys.executable).parent / "codetainerd")


def default_names() -> list[str]:
    """Every exact name of the shipped allowlist, plus one name under each wildcard."""
    allow = load_allowlist(ROOT / "network" / "domains.conf")
    return sorted({*allow.names, *(f"www.{w}" for w in allow.wildcards)})


def publish_names(world: World, names: list[str]) -> dict[str, str]:
    """Make the world's DNS answer each name with a world host (one SIGHUP in all)."""
    mapping = {n: ALLOWED_HOSTS[i % len(ALLOWED_HOSTS)] for i, n in enumerate(names)}
    for name in names[:-1]:
        world.records[name] = [mapping[name]]
    world.set_records(names[-1], [mapping[names[-1]]])
    return mapping


class FullBoot:
    def __init__(self, world: World, base: Path, env: Mapping[str, str] | None = None,
                 steps: str = "", binds: tuple[tuple[str, str, bool], ...] = (),
                 services: str | None = None, cgroups: Mapping[str, str] | None = None,
                 show_cgroups: bool = True, files: Mapping[str, str] | None = None) -> None:
        """``files``: {path inside: content} written into the root before the boot."""
        self.world = world
        self.root = ScratchRoot(base, netns=world.inner, binds=binds, cgroups=cgroups or {},
                                show_cgroups=show_cgroups, files=dict(files or {}))
        conf = services if services is not None else \
            (ROOT / "supervisord" / "codetainer.conf").read_text()
        (self.root.out / "services.conf").write_text(conf)
        self.socket = str(self.root.out / "control.sock")
        self.log_path = base / "daemon.log"
        argv = [CODETAINERD, "--services", f"{OUT}/services.conf", "--socket",
                f"{OUT}/control.sock"]
        if steps:
            argv += ["--steps", steps]
        self.env = {**DEFAULT_ENV, "CODETAINER_LOG_FORMAT": "json", "FLY_APP_NAME": "sandbox",
                    "GH_PAT": "ghp_SANDBOXnotARealToken0000", "CLAUDE_CODE_OAUTH_TOKEN":
                    "sk-ant-oat01-SANDBOXfake", "CODETAINER_UPSTREAMS": UPSTREAM,
                    "CODETAINER_AGENT_COMMAND": "bash -l",
                    # the image's engine (named, so a missing binary fails the boot rather
                    # than `auto` falling back to dnsmasq); CODETAINER_DNS_ENGINE=dnsmasq
                    # in ``env`` boots the other one
                    "CODETAINER_DNS_ENGINE": "coredns",
                    # the policy proxy is the test's to turn on (tests/integration/
                    # test_proxy_boot.py); the others boot as before it
                    "CODETAINER_PROXY": "off", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.t0 = time.monotonic()
        try:
            self.proc: Spawned = self.root.spawn(argv, env=self.env, stdout=self._log,
                                                 stderr=subprocess.STDOUT)
        except BaseException:
            self._log.close()
            raise

    def call(self, op: str, **args: Any) -> Any:
        with Client(self.socket, timeout=10) as c:
            return c.call(op, **args)

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.call("status")
        return st

    def wait_boot(self, timeout: float = 60.0) -> dict[str, Any]:
        """The full status once the boot has finished (:meth:`wait_finished`)."""
        self.wait_finished(timeout)
        return self.status()

    def wait_finished(self, timeout: float = 60.0) -> str:
        """The boot's end state, polled as the HEALTHCHECK asks (``status`` with ``brief``,
        no costlier than ``ping``) every 10 ms: a full status every 10 ms is daemon CPU the
        boot being timed would pay for (bench/bench_boot.py)."""
        def finished() -> str | None:
            if self.proc.popen.poll() is not None:
                raise AssertionError(f"codetainerd exited {self.proc.popen.returncode}:\n"
                                     f"{self.log()[-4000:]}")
            with contextlib.suppress(DaemonUnreachable, OSError):
                state = str(self.call("status", brief=True)["state"])
                return state if state != "BOOTING" else None
            return None

        state: str = wait_for(finished, timeout, "boot to finish", interval=0.01,
                              context=lambda: self.log()[-4000:])
        return state

    def inside(self, *argv: str, env: Mapping[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        return self.proc.nsenter(list(argv), env=env)

    def nsenter_argv(self, *argv: str, env: Mapping[str, str] | None = None) -> list[str]:
        return ["nsenter", f"--target={self.proc.pid}", "--mount", "--pid", "--net", "--uts",
                "--root", "--wd", "--", "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in {**DEFAULT_ENV, **(env or {})}.items()), *argv]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log())

    def session(self) -> dict[str, Any]:
        info: dict[str, Any] = self.call("session")
        return info

    def wait_session(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the ``session`` op until the agent's session exists; returns its answer."""
        def up() -> dict[str, Any] | None:
            with contextlib.suppress(DaemonUnreachable, OSError):
                info = self.session()
                return dict(info) if info.get("exists") else None
            return None

        info: dict[str, Any] = wait_for(up, timeout, "the agent's session", interval=0.02,
                                        context=lambda: self.log()[-4000:])
        return info

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.popen.poll() is None:
            self.proc.signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc.popen.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def full_boot(env: Mapping[str, str] | None = None, steps: str = "",
              binds: tuple[tuple[str, str, bool], ...] = (), world: World | None = None,
              base: Path | None = None, api: bool = False) -> Iterator[FullBoot]:
    """A booting machine; ``api``: with the stand-in for Anthropic's API in the world."""
    with contextlib.ExitStack() as stack:
        if world is None:
            world = stack.enter_context(World(ttl=60))
            publish_names(world, default_names())
        if base is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ct-boot-")))
            os.chmod(base, 0o755)
        if api:
            env = {**ApiStandIn(world, base).env(), **(env or {})}
        fb = FullBoot(world, base, env=env, steps=steps, binds=binds)
        try:
            yield fb
        finally:
            fb.close()


class ApiStandIn:
    """apistandin.py in the world on API_HOST:443, published as api.anthropic.com,
    with a certificate from a test CA whose certificate the container gets at
    ``/scratch-out/anthropic-ca.pem`` (``env()`` names it in NODE_EXTRA_CA_CERTS)."""

    CA_INSIDE = f"{OUT}/anthropic-ca.pem"

    def __init__(self, world: World, base: Path) -> None:
        from codetainer.sandbox.apistandin import HOSTS, make_ca

        self.dir = base / "standin"
        ca = make_ca(self.dir)
        out = base / "out"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca, out / "anthropic-ca.pem")
        (out / "anthropic-ca.pem").chmod(0o644)
        script = str(Path(__file__).resolve().parent / "apistandin.py")  # -I: by path
        proc = world.spawn_in(world.world, [PYTHON, "-I", script,
                                            str(self.dir), API_HOST])
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "listening":
            raise RuntimeError(f"the API stand-in did not start: {line!r} "
                               f"{proc.stderr.read() if proc.stderr else ''}")
        for host in HOSTS:
            world.set_records(host, [API_HOST])

    def env(self) -> dict[str, str]:
        return {"NODE_EXTRA_CA_CERTS": self.CA_INSIDE}

    def requests(self) -> list[dict[str, Any]]:
        from codetainer.sandbox.apistandin import requests

        return requests(self.dir)


@contextlib.contextmanager
def machine_with_repo(prefix: str, token: str, env: Mapping[str, str] | None = None, *,
                      api: bool = False, forks: Mapping[str, str] | None = None,
                      ) -> Iterator[tuple[FullBoot, ApiStandIn | None, GitServer]]:
    """A machine booted READY with its session up, ``REPO_URL`` naming a private
    repository on the stand-in GitHub (readable with ``token``; ``forks``: a repository
    -> its upstream's URL), optionally with the stand-in for Anthropic's API; every part
    removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    try:
        with World(ttl=60) as world:
            publish_names(world, default_names())
            standin = ApiStandIn(world, base) if api else None
            git = GitServer(world, base, token=token, auth={"owner": ("x-access-token", token)},
                            forks=dict(forks or {}))
            fb = FullBoot(world, base, env={
                "GH_PAT": token, "REPO_URL": git.url("/owner/repo.git"), **git.settings(),
                **(standin.env() if standin else {}), **(env or {})})
            try:
                st = fb.wait_boot()
                assert st["state"] == "READY", st["reasons"]
                fb.wait_session()
                yield fb, standin, git
            finally:
                fb.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


_GIT_SERVER = r"""
import base64, http.server, json, os, sys, threading
cfg = json.loads(sys.stdin.readline())  # on stdin: the credentials stay off argv
stats = {"info_refs": {}, "auth_ok": {}, "auth_denied": {}, "api": 0, "api_auth_ok": 0}
lock = threading.Lock()
def bump(key, sub):
    stats[key][sub] = stats[key].get(sub, 0) + 1
def save():
    tmp = cfg["stats"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, cfg["stats"])
class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=cfg["root"], **kw)
    def log_message(self, *a):
        pass
    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        path = self.path.split("?")[0]
        with lock:
            try:
                self.route(path)
            finally:
                save()
    def route(self, path):
        if path.startswith("/api/repos/"):
            stats["api"] += 1
            if self.headers.get("Authorization") == "Bearer " + cfg["token"]:
                stats["api_auth_ok"] += 1
            slug = path[len("/api/repos/"):].strip("/")
            parent = cfg["forks"].get(slug)
            info = {"full_name": slug, "fork": parent is not None}
            if parent:
                info["parent"] = {"full_name": parent.split("github.com/")[1][:-4],
                                  "clone_url": parent}
            self.reply(200, json.dumps(info).encode(), [("Content-Type", "application/json")])
            return
        repo = "/".join(path.split("/")[:3])
        if path.endswith("/info/refs"):
            bump("info_refs", repo)
        want = cfg["auth"].get(path.split("/")[1])
        if want is not None:
            got = self.headers.get("Authorization", "")
            ok = got.startswith("Basic ") and base64.b64decode(got[6:]).decode() == ":".join(want)
            if not ok:
                bump("auth_denied", repo)
                self.reply(401, headers=[("WWW-Authenticate", 'Basic realm="test"')])
                return
            bump("auth_ok", repo)
        super().do_GET()
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
httpd.daemon_threads = True
save()
print("ready", httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


class GitServer:
    """A git server (dumb HTTP) and a stand-in GitHub API on 127.0.0.1 of the machine's netns.

    It runs in the world's inner network namespace (the one the booted machine joins), so
    the daemon's clone reaches it over loopback, which the firewall always allows; nothing
    outside the namespace can reach it. Repositories: ``/<owner>/repo.git`` for every
    owner in ``auth`` (HTTP basic auth required, ``(user, password)``) and ``/open/repo.git``
    (no auth). The API at ``/api/repos/<owner>/<repo>`` reports the repositories listed in
    ``forks`` as forks of the given GitHub URL, everything else as not a fork, and counts
    the requests that carried ``Bearer <token>``. ``stats()`` reads the server's counters.
    """

    def __init__(self, world: World, base: Path, *, token: str,
                 auth: Mapping[str, tuple[str, str]], forks: Mapping[str, str]) -> None:
        self.dir = base / "git"
        src = base / "git-src"
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q", str(src)], check=True)
        (src / "README.md").write_text("hello\n")
        subprocess.run([*git, "-C", str(src), "add", "."], check=True)
        subprocess.run([*git, "-C", str(src), "commit", "-qm", "initial commit"], check=True)
        for owner in (*auth, "open"):
            bare = self.dir / owner / "repo.git"
            subprocess.run([*git, "clone", "-q", "--bare", str(src), str(bare)], check=True)
            subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
        self.stats_path = base / "git-stats.json"
        cfg = {"root": str(self.dir), "stats": str(self.stats_path), "token": token,
               "auth": {k: list(v) for k, v in auth.items()}, "forks": dict(forks)}
        self.proc = world.spawn_in(world.inner, [PYTHON, "-I", "-c", _GIT_SERVER])
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline().split() if ready else []
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"git server did not start: {line}")
        self.base = f"http://127.0.0.1:{line[1]}"

    def url(self, path: str, userinfo: str = "") -> str:
        return self.base.replace("://", f"://{userinfo}@" if userinfo else "://") + path

    def settings(self) -> dict[str, str]:
        """Daemon settings that make it treat this server as GitHub (web and API)."""
        return {"CODETAINER_GITHUB_URL": self.base, "CODETAINER_GITHUB_API_URL": self.base + "/api"}

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stats_path.read_text())
        return data


# -- the policy proxy's world (issue 13) ---------------------------------------------------------

#: the agent's tmux socket (the daemon's default), and how root becomes the agent
AGENT_SOCK = "/run/codetainer/tmux/agent.sock"
AGENT_UID = 1000
AS_AGENT = ("setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups",
            "--no-new-privs", "--bounding-set=-all", "--")


LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")


@dataclass
class AgentRun:
    returncode: int
    stdout: str
    stderr: str


class AgentShell:
    """Commands typed into the agent's own shell pane: the login shell the daemon started in
    the agent's tmux session, so they run with the environment, limits and filters the
    daemon gave the agent's tree, as a prompt-injected agent's commands would.

    Each run is a script in ``/scratch-out/agent-runs`` (``base/out`` on the host);
    its output and exit status come back through files beside it. One run at a time.
    """

    def __init__(self, fb: FullBoot) -> None:
        self.fb = fb
        self.dir = fb.root.out / "agent-runs"
        self.dir.mkdir(exist_ok=True)
        self.dir.chmod(0o777)
        self.n = 0

    def pane(self) -> str:
        """The shell pane's id (``@codetainer_role`` shell), else the agent pane."""
        r = self.fb.inside(*AS_AGENT, "tmux", "-S", AGENT_SOCK, "list-panes", "-a", "-F",
                           "#{pane_id}\t#{@codetainer_role}")
        assert r.returncode == 0, r.stderr
        roles = dict(line.split("\t")[::-1] for line in r.stdout.splitlines() if "\t" in line)
        pane = roles.get("shell") or roles.get("agent")
        assert pane, f"no pane of the agent's session: {r.stdout!r}"
        return pane

    def run(self, script: str, timeout: float = 60.0) -> AgentRun:
        self.n += 1
        name = f"{os.getpid()}-{self.n}"
        (self.dir / f"{name}.sh").write_text(script)
        (self.dir / f"{name}.sh").chmod(0o644)
        inside = f"{OUT}/agent-runs/{name}"
        line = (f"timeout -k 5 {int(timeout)} bash {inside}.sh </dev/null >{inside}.out "
                f"2>{inside}.err; echo $? >{inside}.rc.tmp; mv {inside}.rc.tmp {inside}.rc")
        pane = self.pane()
        for keys in (("-l", line), ("Enter",)):
            r = self.fb.inside(*AS_AGENT, "tmux", "-S", AGENT_SOCK, "send-keys", "-t", pane, *keys)
            assert r.returncode == 0, r.stderr
        rc = self.dir / f"{name}.rc"

        def screen() -> str:
            r = self.fb.inside(*AS_AGENT, "tmux", "-S", AGENT_SOCK, "capture-pane", "-p", "-t", pane)
            return f"the shell pane:\n{r.stdout}"

        wait_for(rc.exists, timeout + 15, f"the agent's shell to run {script[:60]!r}",
                 context=screen)
        return AgentRun(int(rc.read_text().strip()), (self.dir / f"{name}.out").read_text(),
                        (self.dir / f"{name}.err").read_text())


@dataclass
class ProxyMachine:
    """A machine booted READY with ``CODETAINER_PROXY=on`` in a world of stand-ins."""

    fb: FullBoot
    standins: StandIns
    #: the real secrets the machine booted with (the agent must never hold them)
    github_token: str
    oauth_token: str
    shell: AgentShell

    def agent(self, script: str, timeout: float = 60.0) -> AgentRun:
        return self.shell.run(script, timeout)


@contextlib.contextmanager
def proxy_boot(base: Path, env: Mapping[str, str] | None = None, steps: str = "",
               github_token: str = "", oauth_token: str = ""
               ) -> Iterator[tuple[FullBoot, StandIns]]:
    """World + stand-ins (standins.py) + a booting machine (not waited for) with the
    policy proxy on, ``REPO_URL=https://github.com/owner/repo.git`` (the stand-in GitHub,
    cloned with the real token), the given real tokens (fresh random ones by default), the
    test CA in the machine's system store and named in ``CODETAINER_PROXY_UPSTREAM_CA``.
    ``./dev sandbox`` runs this; :func:`proxy_machine` waits for it."""
    from codetainer.proxy.model import ANTHROPIC_PLACEHOLDER, GITHUB_PLACEHOLDER

    github_token = github_token or "ghp_PROXYworldREAL" + secrets.token_hex(11)
    oauth_token = oauth_token or "sk-ant-oat01-PROXYworldREAL" + secrets.token_hex(12)
    with World(ttl=60) as world:
        publish_names(world, default_names())
        standins = StandIns(world, base, github_token=github_token, oauth_token=oauth_token,
                            placeholders=(GITHUB_PLACEHOLDER, ANTHROPIC_PLACEHOLDER))
        # The image's /usr/local/share/ca-certificates is writable until the root goes
        # read-only (the proxy step installs its CA there); the scratch root binds the
        # host's /usr read-only, so a directory of our own stands in for it, holding
        # the host's local CAs and the test CA (as the store holds public CAs).
        local_ca = base / "local-ca"
        if LOCAL_CA_DIR.is_dir():
            shutil.copytree(LOCAL_CA_DIR, local_ca)
        else:
            local_ca.mkdir()
        local_ca.chmod(0o755)
        shutil.copyfile(standins.ca, local_ca / "codetainer-test-world.crt")
        fb = FullBoot(world, base, steps=steps, env={
            "CODETAINER_PROXY": "on", **standins.env(), "GH_PAT": github_token,
            "CLAUDE_CODE_OAUTH_TOKEN": oauth_token,
            "REPO_URL": "https://github.com/owner/repo.git", **(env or {})},
            binds=((str(local_ca), str(LOCAL_CA_DIR), False),),
            files={"/etc/ssl/certs/ca-certificates.crt": standins.system_bundle()})
        try:
            yield fb, standins
        finally:
            fb.close()


@contextlib.contextmanager
def proxy_machine(prefix: str, env: Mapping[str, str] | None = None) -> Iterator[ProxyMachine]:
    """:func:`proxy_boot` in a fresh scratch directory; yields once READY with the session
    up."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    github_token = "ghp_PROXYworldREAL" + secrets.token_hex(11)
    oauth_token = "sk-ant-oat01-PROXYworldREAL" + secrets.token_hex(12)
    try:
        with proxy_boot(base, env, github_token=github_token, oauth_token=oauth_token) as (
                fb, standins):
            st = fb.wait_boot(timeout=120)
            assert st["state"] == "READY", (st["reasons"], fb.log()[-4000:])
            fb.wait_session()
            yield ProxyMachine(fb, standins, github_token, oauth_token, AgentShell(fb))
    finally:
        shutil.rmtree(base, ignore_errors=True)
