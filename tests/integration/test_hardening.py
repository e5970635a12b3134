"""The hardening beside the policy proxy, tried for real: the agent's tree cannot create
or join a user namespace (the seccomp filter of ``boot/seccomp.py``, loaded by the exec
chain), writes no core file, the daemon and its init are non-dumpable, and with the proxy
on nothing the agent can read holds a real token.

The chain on its own first (setpriv_argv run as root, as the daemon runs it), then in
full boots: what the agent's own panes get, probed from inside them (``send-keys``), each
with the control beside it (the same probe as the same uid without the filter succeeds;
a dumpable root process is readable where the daemon is not).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.boot import seccomp
from codetainer.boot.privileges import AgentUser, ExecLimits, setpriv_argv
from codetainer.proxy.model import GITHUB_PLACEHOLDER
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import FullBoot, machine_with_repo
from codetainer.sandbox.scratchroot import OUT
from codetainer.sandbox.world import PYTHON

pytestmark = pytest.mark.integration

UID = 1000
SOCK = "/run/codetainer/tmux/agent.sock"
#: no user has it: what these tests start as it is all it runs
SPARE_UID = 64125
SPARE = AgentUser("spare", SPARE_UID, SPARE_UID, "/")
#: the same drop as the chain's, without the filter (the control)
DROP = ("setpriv", f"--reuid={SPARE_UID}", f"--regid={SPARE_UID}", "--clear-groups",
        "--no-new-privs", "--bounding-set=-all", "--")
AS_AGENT = ("setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
            "--bounding-set=-all", "--")
GH_PAT = "ghp_HARDENINGgithubToken012345"
OAUTH = "sk-ant-oat01-HARDENINGclaudeToken6789"

#: Each way into a new user namespace, in a fresh child each (a namespace made by one
#: probe would change what the next one may do), and what must keep working.
NS_PROBE = r"""
import ctypes, errno, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
NEWUSER, SIGCHLD = 0x10000000, 17
def raw(nr, *args):
    rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return rc, ctypes.get_errno()
def clone3():
    args = (ctypes.c_uint64 * 8)(NEWUSER, 0, 0, 0, SIGCHLD, 0, 0, 0)
    rc = libc.syscall(ctypes.c_long(435), ctypes.byref(args), ctypes.c_long(64))
    return rc, ctypes.get_errno()
probes = {
    "unshare": lambda: (libc.unshare(NEWUSER), ctypes.get_errno()),
    "clone": lambda: raw(56, NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "clone3": clone3,
    "setns": lambda: (libc.setns(-1, 0), ctypes.get_errno()),
}
out = {}
for name, probe in probes.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        rc, err = probe()
        if rc == 0:
            os._exit(0)  # the namespace's own child, or the probe that succeeded
        os.write(w, (errno.errorcode.get(err, str(err)) if rc < 0 else "ok").encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    out[name] = os.read(r, 100).decode() or "ok"
    os.close(r)
t = threading.Thread(target=lambda: None)
t.start()
t.join()
out["thread"] = "ok"  # glibc's pthread_create tries clone3 first, then clone
pid = os.posix_spawn("/bin/true", ["true"], {})  # so does glibc's posix_spawn
out["posix_spawn"] = "ok" if os.waitpid(pid, 0)[1] == 0 else "failed"
out["spawn"] = subprocess.run(["/bin/sh", "-c", "echo spawned"], capture_output=True,
                              text=True).stdout.strip()
out["seccomp"] = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("Seccomp:")][0]
print(json.dumps(out))
"""

FILTERED = {"unshare": "EPERM", "clone": "EPERM", "clone3": "ENOSYS", "setns": "EPERM",
            "thread": "ok", "posix_spawn": "ok", "spawn": "spawned", "seccomp": "2"}


def until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    return wait_for(pred, timeout, what)


# -- the chain on its own ---------------------------------------------------------------------

def run(argv: list[str] | tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def test_the_chain_refuses_every_way_into_a_user_namespace_and_keeps_the_rest() -> None:
    r = run(setpriv_argv(SPARE, [PYTHON, "-I", "-c", NS_PROBE], ExecLimits(1000, 10, 64, ())))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == FILTERED
    r = run(setpriv_argv(SPARE, ["unshare", "-U", "true"], ExecLimits(1000, 10, 64, ())))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    assert run(setpriv_argv(SPARE, ["unshare", "--help"])).returncode == 0
    # control: the same uid, the same drop, without the filter
    r = run([*DROP, PYTHON, "-I", "-c", NS_PROBE])
    assert json.loads(r.stdout) == {"unshare": "ok", "clone": "ok", "clone3": "ok",
                                    "setns": "EBADF", "thread": "ok", "posix_spawn": "ok",
                                    "spawn": "spawned", "seccomp": "0"}, r.stderr
    assert run([*DROP, "unshare", "-U", "true"]).returncode == 0


def test_the_chain_sets_no_core_files_for_good() -> None:
    script = ("grep 'core file' /proc/self/limits; ulimit -c 0 && echo lowered; "
              "ulimit -c unlimited 2>/dev/null && echo raised || echo kept")
    r = run(setpriv_argv(SPARE, ["/bin/sh", "-c", script]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[-3:] == ["0", "0", "bytes"], lines
    assert lines[1:] == ["lowered", "kept"]


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A directory the spare uid can write in (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ct-hardening-", dir="/tmp"))
    path.chmod(0o777)  # the unprivileged side must be able to leave a marker
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_filter_that_does_not_load_stops_the_chain(shared_dir: Path) -> None:
    """Fail closed: whatever goes wrong in the loader, the program never runs."""
    marker = shared_dir / "ran"
    program = ["/bin/sh", "-c", f"echo > {marker}"]
    base = [*DROP, seccomp.python(), "-I", "-S", "-c", seccomp.LOADER]
    # one instruction that is not a return: the kernel's checker refuses the program
    for hexed in ("00" * 8, "not-hex"):
        r = run([*base, hexed, "--", *program])
        assert r.returncode == 126 and "codetainer-seccomp" in r.stderr, r
        assert not marker.exists()
    r = run([*base, seccomp.compile_filter().hex(), "--", "/nonexistent/program"])
    assert r.returncode == 127 and "cannot run /nonexistent/program" in r.stderr, r
    assert run([*base, seccomp.compile_filter().hex(), "--", *program]).returncode == 0
    assert marker.exists()


# -- in a full boot ---------------------------------------------------------------------------

def pane(fb: FullBoot, role: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in fb.status()["session"]["panes"] if p["role"] == role)
    return found


def in_pane(fb: FullBoot, role: str, command: str, done: Path, timeout: float = 30.0) -> None:
    """Type ``command`` into the agent's ``role`` pane; wait for it to create ``done``."""
    done.unlink(missing_ok=True)
    r = fb.inside("tmux", "-S", SOCK, "send-keys", "-t", pane(fb, role)["id"], command, "Enter")
    assert r.returncode == 0, r.stderr
    until(done.exists, timeout, f"{command!r} in the {role} pane")


@pytest.fixture(scope="module")
def machine() -> Iterator[FullBoot]:
    with machine_with_repo("ct-hardening-", GH_PAT, {"CLAUDE_CODE_OAUTH_TOKEN": OAUTH}) as (fb, _, _):
        yield fb


PANE_PROBE = f"""o={OUT}/pane
unshare -U true >$o.unshare.out 2>&1; echo $? >$o.unshare.rc
unshare --help >/dev/null 2>&1; echo $? >$o.help.rc
python3 -I {OUT}/ns_probe.py >$o.ns 2>&1
grep 'core file' /proc/self/limits >$o.core
(ulimit -c unlimited) >/dev/null 2>&1; echo $? >$o.raise.rc
echo done >$o.done
"""


@pytest.mark.parametrize("role", ["agent", "shell"])
def test_the_agents_panes_cannot_make_a_user_namespace(machine: FullBoot, role: str) -> None:
    fb = machine
    out = fb.root.out
    (out / "ns_probe.py").write_text(NS_PROBE)
    (out / "pane.sh").write_text(PANE_PROBE)
    in_pane(fb, role, f"sh {OUT}/pane.sh", out / "pane.done")
    assert (out / "pane.unshare.rc").read_text().strip() == "1"
    assert "Operation not permitted" in (out / "pane.unshare.out").read_text()
    assert (out / "pane.help.rc").read_text().strip() == "0"
    assert json.loads((out / "pane.ns").read_text()) == FILTERED
    assert (out / "pane.core").read_text().split()[-3:] == ["0", "0", "bytes"]
    assert (out / "pane.raise.rc").read_text().strip() != "0"
    # every process of the tree the daemon started carries the filter and the limit
    session = fb.status()["session"]
    for pid in (session["server_pid"], pane(fb, role)["pid"]):
        status = fb.inside("cat", f"/proc/{pid}/status").stdout
        assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status, pid
        limits = fb.inside("grep", "core file", f"/proc/{pid}/limits").stdout
        assert limits.split()[-3:] == ["0", "0", "bytes"], pid
    # control: uid 1000 outside the chain (the test's own setpriv) still can
    r = fb.inside(*AS_AGENT, "unshare", "-U", "true")
    assert r.returncode == 0, r.stderr


def test_the_daemon_and_its_init_are_not_dumpable(machine: FullBoot) -> None:
    """codetainerd makes itself non-dumpable before anything else and the daemon inherits
    it (the daemon reports what the kernel says, PR_GET_DUMPABLE; from outside, a process
    with every capability of root's sees no difference, and one with fewer may ptrace
    neither kind). The same probe in a root process of the same machine says dumpable."""
    fb = machine
    started = [e for e in fb.events() if e.get("event") == "daemon_started"]
    assert len(started) == 1 and started[0]["dumpable"] is False, started
    probe = "from codetainer.init import dumpable; print(dumpable())"
    r = fb.inside(sys.executable, "-I", "-c", probe)
    assert r.stdout.strip() == "True", r
    # its processes, as the agent sees them: nothing of their environment
    daemon = started[0]["pid"]
    assert fb.inside("cat", f"/proc/{daemon}/cmdline").stdout.split("\0")[1].endswith("codetainerd")
    r = fb.inside(*AS_AGENT, "cat", "/proc/1/environ", f"/proc/{daemon}/environ")
    assert r.returncode != 0 and r.stdout == "", r


# -- with the proxy on: placeholders only ----------------------------------------------------

SCAN = f"""pat={OUT}/patterns
{{ for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' '\\n' <"$f"; echo; done
   tmux -S {SOCK} show-environment -g; tmux -S {SOCK} show-environment
   for b in $(tmux -S {SOCK} list-buffers -F '#{{buffer_name}}'); do
     tmux -S {SOCK} show-buffer -b "$b"; echo; done
   for p in $(tmux -S {SOCK} list-panes -a -F '#{{pane_id}}'); do
     tmux -S {SOCK} capture-pane -p -S - -t "$p"; done
}} 2>/dev/null >{OUT}/scan.text
grep -c -F -f $pat {OUT}/scan.text >{OUT}/scan.procs
grep -r -l -D skip -F -f $pat /home /tmp /run /workspace /etc /var 2>/dev/null >{OUT}/scan.files
grep -c -F -e {GITHUB_PLACEHOLDER} {OUT}/scan.text >{OUT}/scan.placeholders
echo done >{OUT}/scan.done
"""
#: What the agent's tools leave behind, typed into its shell pane: git asks its
#: credential helper (gh, or the environment) for GitHub's password; a tmux buffer.
TOOLS = ("printf 'protocol=https\\nhost=github.com\\n\\n' | git credential fill "
         ">/tmp/credential.txt 2>&1; "
         f"tmux set-buffer \"$GH_TOKEN $CLAUDE_CODE_OAUTH_TOKEN\"; echo >{OUT}/tools.done")


def scan(fb: FullBoot) -> dict[str, Any]:
    """Use the tools in the agent's pane, then read everything uid 1000 can: every
    environment and command line it may open, its home, /tmp, /run, the workspace, /etc,
    /var, tmux's environments, buffers and scrollback. Counts and file names of hits."""
    out = fb.root.out
    (out / "patterns").write_text(f"{GH_PAT}\n{OAUTH}\n")
    (out / "scan.sh").write_text(SCAN)
    in_pane(fb, "shell", TOOLS, out / "tools.done")
    (out / "scan.done").unlink(missing_ok=True)
    r = fb.inside(*AS_AGENT, "sh", f"{OUT}/scan.sh")
    assert r.returncode == 0 and (out / "scan.done").exists(), r.stderr
    return {"procs": int((out / "scan.procs").read_text()),
            "files": set((out / "scan.files").read_text().split()),
            "placeholders": int((out / "scan.placeholders").read_text())}


def test_with_the_proxy_off_the_scan_finds_every_copy(machine: FullBoot) -> None:
    """The control of the next test: the same scan, the proxy off, finds the tokens where
    docs/credentials.md says the agent holds them."""
    found = scan(machine)
    assert found["procs"] >= 3, found  # the panes, the tmux server, the buffer
    assert {"/home/claude/.config/gh/hosts.yml", "/tmp/credential.txt",
            "/home/claude/.config/codetainer/claude-oauth-token"} <= found["files"], found
    assert found["placeholders"] == 0


def test_with_the_proxy_on_the_agent_can_read_no_token() -> None:
    from codetainer.settings import Settings

    if "proxy" not in Settings.__dataclass_fields__:
        pytest.fail("CODETAINER_PROXY is not a setting yet: the proxy (issue 13) is missing")
    env = {"CLAUDE_CODE_OAUTH_TOKEN": OAUTH, "CODETAINER_PROXY": "on"}
    with machine_with_repo("ct-notoken-", GH_PAT, env) as (fb, _, _):
        found = scan(fb)
        assert found["procs"] == 0 and found["files"] == set(), found
        # control: the scan did read what the agent holds, the placeholders
        assert found["placeholders"] >= 3, found
        # git's credential helper answers with the placeholder the proxy swaps
        text = fb.inside("cat", "/tmp/credential.txt").stdout
        assert f"password={GITHUB_PLACEHOLDER}" in text, text
