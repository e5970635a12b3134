"""The real daemon, as PID 1, booting inside a scratch root (codetainer/sandbox/scratchroot.py).

codetainerd runs as PID 1 of fresh PID, mount, UTS and network namespaces pivoted into a
scratch root; its control socket is put in the shared output directory, so the test
talks to it from the host with the ordinary client. Its stdout and stderr go to a log
file in the test's directory, read in full once the daemon has stopped.

The boot-step tests need the steps of issue 4 in ``boot/plan.py`` (``all_steps``);
until the plan lists them, codetainerd rejects ``--steps`` and these tests fail saying so.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.control.client import Client, DaemonUnreachable
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.scratchroot import DEFAULT_ENV, OUT, ScratchRoot, Spawned

pytestmark = pytest.mark.integration

GH_PAT = "ghp_FULLBOOTsecret0123456789"
OAUTH = "sk-ant-oat01-FULLBOOToauth98765"
# as the image boots, minus the network steps (no test world here), plus the session
BOOT_STEPS = ("secrets,filesystem,credentials,agent-settings,readonly-root,repository,"
              "readiness,readiness-degraded,session")
AGENT_COMMAND = "sleep 100000"
SOCK = "/run/codetainer/tmux/agent.sock"
CODETAINERD = str(Path(sys.executable).parent / "codetainerd")
NO_SERVICES = "[supervisord]\nnodaemon=true\n"


class Booted:
    def __init__(self, root: ScratchRoot, proc: Spawned, log_path: Path) -> None:
        self.root = root
        self.proc = proc
        self.socket = str(root.out / "control.sock")
        self.log_path = log_path

    def call(self, op: str, **args: Any) -> Any:
        with Client(self.socket, timeout=10) as c:
            return c.call(op, **args)

    def wait_boot(self, timeout: float = 30.0) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            if self.proc.popen.poll() is not None:
                raise AssertionError(f"codetainerd exited {self.proc.popen.returncode}:\n"
                                     f"{self.log_path.read_text()[-5000:]}")
            with contextlib.suppress(DaemonUnreachable, OSError):
                st = self.call("status")
                return dict(st) if st["state"] != "BOOTING" else None
            return None

        st: dict[str, Any] = wait_for(finished, timeout, "boot to finish")
        return st

    def inside(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.proc.nsenter(list(argv))

    def wait_session(self, timeout: float = 30.0) -> dict[str, Any]:
        def up() -> dict[str, Any] | None:
            info = self.call("session")
            return dict(info) if info["exists"] else None

        info: dict[str, Any] = wait_for(up, timeout, "the agent's session", interval=0.02)
        return info

    def stopped_log(self) -> tuple[str, list[str]]:
        """SIGTERM, wait for the exit, then the whole log: (text, event names)."""
        self.proc.signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0
        text = self.log_path.read_text(errors="replace")
        events = [json.loads(line).get("event", "") for line in text.splitlines()
                  if line.startswith("{")]
        assert events, f"no JSON log lines in {self.log_path}: {text[-2000:]!r}"
        for name in ("daemon_started", "boot_step_start", "shutdown_complete"):
            assert name in events, f"{name} missing from the log"
        return text, events


@contextlib.contextmanager
def boot(tmp_path: Path, steps: str, env: dict[str, str],
         binds: tuple[tuple[str, str, bool], ...] = ()) -> Iterator[Booted]:
    root = ScratchRoot(tmp_path, binds=binds)
    (root.out / "services.conf").write_text(NO_SERVICES)
    argv = [CODETAINERD, "--services", f"{OUT}/services.conf", "--socket",
            f"{OUT}/control.sock", "--steps", steps]
    full_env = {**DEFAULT_ENV, "CODETAINER_LOG_FORMAT": "json", "FLY_APP_NAME": "myapp",
                "CODETAINER_AGENT_COMMAND": AGENT_COMMAND,
                "CODETAINER_PROXY": "off",  # as before the proxy: the agent holds the tokens
                **env}
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = root.spawn(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Booted(root, proc, log_path)
    finally:
        proc.kill()


def test_daemon_runs_as_pid1_in_the_scratch_root_and_stops_on_sigterm(tmp_path: Path) -> None:
    with boot(tmp_path, "services", {}) as b:
        st = b.wait_boot()
        assert st["state"] == "READY", st["reasons"]
        assert b.inside("cat", "/proc/1/cmdline").stdout.split("\0")[1].endswith("codetainerd")
        assert b.inside("hostname").stdout.strip() == "codetainer-test"
        b.proc.signal(signal.SIGTERM)
        assert b.proc.wait(30) == 0


def _bare_repo(tmp_path: Path) -> Path:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    src = tmp_path / "src"
    subprocess.run([*git, "init", "-q", str(src)], check=True)
    (src / "README.md").write_text("hi\n")
    subprocess.run([*git, "-C", str(src), "add", "."], check=True)
    subprocess.run([*git, "-C", str(src), "commit", "-qm", "first"], check=True)
    bare = tmp_path / "bare.git"
    subprocess.run([*git, "clone", "-q", "--bare", str(src), str(bare)], check=True)
    return bare


def _secret_leaks(b: Booted, st: dict[str, Any]) -> list[str]:
    """Where the secrets are while the machine runs (the log: after stop, see the tests)."""
    leaks = []
    for value in (GH_PAT, OAUTH):
        if value in json.dumps(st):
            leaks.append("status reply")
        if value in json.dumps(b.call("session")):
            leaks.append("session reply")
    cmdlines = b.inside("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    assert "codetainerd" in cmdlines and AGENT_COMMAND in cmdlines, "command lines not read"
    if GH_PAT in cmdlines or OAUTH in cmdlines:
        leaks.append("a command line")
    # every process but the agent's (which must have them) keeps them out of its environment
    environs = b.inside("sh", "-c", 'for p in /proc/[0-9]*; do [ "$(stat -c %u $p)" = 1000 ] '
                        '|| { printf "%s " "$p"; tr "\\0" " " < $p/environ; echo; }; done'
                        ).stdout
    assert "/proc/1 " in environs, "environments not read"
    leaks += [f"environment of {line.split()[0]}" for line in environs.splitlines()
              if GH_PAT in line or OAUTH in line]
    files = b.inside("grep", "-rlF", "-e", GH_PAT, "-e", OAUTH, "/etc", "/run", "/workspace",
                     "/tmp", "/home", "/root").stdout.split()
    # the files that must hold a token: prove the grep searched where it counts
    holders = {"/home/claude/.config/gh/hosts.yml",
               "/home/claude/.config/codetainer/claude-oauth-token"}
    assert holders <= set(files), files
    leaks += [f for f in files if f not in holders]
    return leaks


def agent_processes(b: Booted) -> list[str]:
    """Every process of uid 1000 (real or effective), as ``comm``, and the tmux sessions."""
    ps = b.inside("ps", "-o", "comm=", "-u", "1000", "-U", "1000")
    assert ps.returncode in (0, 1), ps.stderr  # 1: none
    sessions = b.inside("tmux", "-S", SOCK, "list-sessions", "-F", "tmux session #{session_id}")
    return sorted(ps.stdout.splitlines() + sessions.stdout.splitlines())


def test_full_boot_with_clone_is_ready_and_read_only(tmp_path: Path) -> None:
    bare = _bare_repo(tmp_path)
    env = {"GH_PAT": GH_PAT, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH,
           "REPO_URL": "file:///srv/bare.git"}
    with boot(tmp_path, BOOT_STEPS, env, binds=((str(bare), "/srv/bare.git", True),)) as b:
        st = b.wait_boot(60)
        assert st["state"] == "READY", st["reasons"]
        mounts = b.inside("findmnt", "-J", "-o", "TARGET,FSTYPE,OPTIONS").stdout
        tree = json.loads(mounts)["filesystems"][0]
        assert tree["target"] == "/" and tree["options"].startswith("ro")
        kids = {c["target"]: c for c in tree.get("children", [])}
        assert "size=524288k" in kids["/workspace"]["options"]
        assert "size=1048576k" in kids["/home/claude"]["options"]
        assert b.inside("touch", "/usr/x").returncode != 0
        assert b.inside("touch", "/workspace/x").returncode == 0
        # as the agent: root is refused in a tree it does not own (safe.directory)
        log = b.inside("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "env",
                       "HOME=/home/claude", "git", "-C", "/workspace/repo", "log",
                       "--format=%s").stdout
        assert log.strip() == "first"
        assert b.inside("stat", "-c", "%u", "/workspace/repo").stdout.strip() == "1000"
        # the session phase ran: the agent is up, and the check below sees it
        info = b.wait_session()
        procs = agent_processes(b)
        assert {"tmux: server", "sleep", "bash", f"tmux session {info['id']}"} <= set(procs), procs
        assert _secret_leaks(b, st) == []
        # the log, complete once the daemon has exited: the boot and the session are in
        # it, the secret values are not
        text, events = b.stopped_log()
        for name in ("secrets_loaded", "credentials_configured", "repository_ready",
                     "root_readonly", "session_ready", "session_stopped"):
            assert name in events, f"{name} missing from the log"
        assert GH_PAT not in text and OAUTH not in text


def test_full_boot_without_secrets_fails_with_instructions(tmp_path: Path) -> None:
    with boot(tmp_path, BOOT_STEPS, {}) as b:
        st = b.wait_boot()
        assert st["state"] == "FAILED"
        text = " ".join(st["reasons"])
        assert "GH_PAT is not set" in text and "CLAUDE_CODE_OAUTH_TOKEN is not set" in text
        assert "fly secrets set GH_PAT=<value> -a myapp" in text
        # the session phase is on (as in the image) but never starts after FAILED: no
        # tmux server, no agent, nothing of uid 1000 (the same check sees them in
        # test_full_boot_with_clone_is_ready_and_read_only)
        info = b.call("session")
        assert not info["exists"] and info["state"] == "STOPPED", info
        assert agent_processes(b) == []
        assert b.inside("test", "-e", SOCK).returncode != 0
        _text, events = b.stopped_log()
        assert "boot_step_failed" in events
        assert not [e for e in events if e.startswith("session_")], "a session was started"
