"""The real daemon, as PID 1, booting inside a scratch root (tests/scratchroot.py).

codetainerd runs as PID 1 of fresh PID, mount, UTS and network namespaces pivoted into a
scratch root; its control socket is put in the shared output directory, so the test
talks to it from the host with the ordinary client.

The boot-step tests need the steps of issue 4 in ``boot/plan.py`` (``all_steps``);
until the plan lists them, codetainerd rejects ``--steps`` and these tests fail saying so.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codetainer.control.client import Client, DaemonUnreachable
from scratchroot import DEFAULT_ENV, OUT, ScratchRoot, Spawned

pytestmark = pytest.mark.integration

GH_PAT = "ghp_FULLBOOTsecret0123456789"
OAUTH = "sk-ant-oat01-FULLBOOToauth98765"
BOOT_STEPS = ("secrets,filesystem,credentials,agent-settings,readonly-root,repository,"
              "readiness,readiness-degraded")
CODETAINERD = str(Path(sys.executable).parent / "codetainerd")
NO_SERVICES = "[supervisord]\nnodaemon=true\n"


class Booted:
    def __init__(self, root: ScratchRoot, proc: Spawned) -> None:
        self.root = root
        self.proc = proc
        self.socket = str(root.out / "control.sock")

    def call(self, op: str, **args: Any) -> Any:
        with Client(self.socket, timeout=10) as c:
            return c.call(op, **args)

    def wait_boot(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"codetainerd exited {self.proc.popen.returncode}:\n"
                                     f"{out[-3000:]}\n{err[-3000:]}")
            with contextlib.suppress(DaemonUnreachable, OSError):
                last = self.call("status")
                if last["state"] not in ("BOOTING",):
                    return dict(last)
            time.sleep(0.05)
        raise AssertionError(f"boot did not finish in {timeout}s; last status {last}")

    def inside(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.proc.nsenter(list(argv))


@contextlib.contextmanager
def boot(tmp_path: Path, steps: str, env: dict[str, str],
         binds: tuple[tuple[str, str, bool], ...] = ()) -> Iterator[Booted]:
    root = ScratchRoot(tmp_path, binds=binds)
    (root.out / "services.conf").write_text(NO_SERVICES)
    argv = [CODETAINERD, "--services", f"{OUT}/services.conf", "--socket",
            f"{OUT}/control.sock", "--steps", steps]
    full_env = {**DEFAULT_ENV, "CODETAINER_LOG_FORMAT": "json", "FLY_APP_NAME": "myapp", **env}
    proc = root.spawn(argv, env=full_env)
    try:
        yield Booted(root, proc)
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
    leaks = []
    out, err = "", ""
    if b.proc.popen.poll() is not None:
        out, err = b.proc.communicate()
    for value in (GH_PAT, OAUTH):
        if value in json.dumps(st):
            leaks.append("status reply")
        if value in out + err:
            leaks.append("daemon log")
    cmdlines = b.inside("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    if GH_PAT in cmdlines or OAUTH in cmdlines:
        leaks.append("a command line")
    # every process but the agent's (which must have them) keeps them out of its environment
    environs = b.inside("sh", "-c", 'for p in /proc/[0-9]*; do [ "$(stat -c %u $p)" = 1000 ] '
                        '|| { printf "%s " "$p"; tr "\\0" " " < $p/environ; echo; }; done'
                        ).stdout
    leaks += [f"environment of {line.split()[0]}" for line in environs.splitlines()
              if GH_PAT in line or OAUTH in line]
    files = b.inside("grep", "-rlF", "-e", GH_PAT, "-e", OAUTH, "/etc", "/run", "/workspace",
                     "/tmp", "/home", "/root").stdout.split()
    leaks += [f for f in files if f != "/home/claude/.config/gh/hosts.yml"]
    return leaks


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
        assert _secret_leaks(b, st) == []


def test_full_boot_without_secrets_fails_with_instructions(tmp_path: Path) -> None:
    with boot(tmp_path, BOOT_STEPS, {}) as b:
        st = b.wait_boot()
        assert st["state"] == "FAILED"
        text = " ".join(st["reasons"])
        assert "GH_PAT is not set" in text and "CLAUDE_CODE_OAUTH_TOKEN is not set" in text
        assert "fly secrets set GH_PAT=<value> -a myapp" in text
        agent = b.inside("ps", "-o", "user=", "-u", "1000").stdout.split()
        assert agent == []
