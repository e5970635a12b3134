"""The agent cannot take the machine down: memory, processes and disk, in a full boot.

codetainerd runs as PID 1 of a scratch root joined to the test world, inside cgroups this
module makes (codetainer.sandbox.cgroups: cgroup v1 ``memory`` 512 MiB and ``pids`` 400,
under the test's own cgroups), so whatever the agent does stays inside limits the test chose:

* ``cgroup_machine`` sees those cgroups as its own at ``/sys/fs/cgroup/<controller>`` (as
  a container does), and the kernel log (``/dev/kmsg``, read-only): the daemon puts the
  agent in ``<own>/agent`` with 75 % of the memory, ``CODETAINER_AGENT_PIDS=200``, a CPU
  weight; small tmpfs sizes (32 MiB) so filling them stays well inside the memory limit;
* ``rlimit_machine`` runs in the same kind of cgroups but cannot see them: the agent is
  held by RLIMIT_NPROC, nice and ``oom_score_adj`` alone.

Everything the agent does, it does in its own tmux panes (``send-keys`` as the agent).
The fork bomb is bounded by the script itself (it stops at the first failed fork, 5,000
forks or 30 s, and its sleepers exit when it closes a pipe) besides the limits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.boot.privileges import AgentUser, ExecLimits, setpriv_argv
from codetainer.cli.render import limits_mode
from codetainer.sandbox.cgroups import SandboxCgroups
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import FullBoot, default_names, publish_names
from codetainer.sandbox.world import World

pytestmark = pytest.mark.integration

SOCK = "/run/codetainer/tmux/agent.sock"
CLI = str(Path(sys.executable).parent / "codetainer")
AGENT_PIDS = 200
SANDBOX_MEMORY = 512 << 20
SMALL = "32m"
AS_AGENT = ("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--")

BOMB = r"""import errno, json, os, sys, time
tag = sys.argv[1]
r, w = os.pipe()
forked, error = 0, None
deadline = time.monotonic() + 30
while forked < 5000 and time.monotonic() < deadline:
    try:
        pid = os.fork()
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc.errno))
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # a sleeper: until every write end is closed
        os._exit(0)
    forked += 1
os.close(r)
with open(f"/scratch-out/bomb-{tag}.tmp", "w") as f:
    json.dump({"forked": forked, "error": error}, f)
os.rename(f"/scratch-out/bomb-{tag}.tmp", f"/scratch-out/bomb-{tag}.json")
end = time.monotonic() + 90
while not os.path.exists(f"/scratch-out/bomb-{tag}.release") and time.monotonic() < end:
    time.sleep(0.05)
os.close(w)  # every sleeper reads EOF and exits
"""

HOG = "x = []\nwhile True:\n    x.append(b'\\x01' * (1 << 20))\n"

FILL = r"""o=/scratch-out/fill
for d in /tmp /workspace /home/claude /run/codetainer/tmux; do
    dd if=/dev/zero of=$d/fill bs=1M 2>>$o.dd; echo "$d $?" >>$o.rc
done
touch /run/codetainer/agent-was-here 2>$o.run; echo $? >$o.run.rc
echo done >$o.done
"""


def until(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    return wait_for(pred, timeout, what, interval=0.05)


def boot(base: Path, world: World, cgroups: SandboxCgroups, show: bool) -> FullBoot:
    env = {"CODETAINER_AGENT_PIDS": str(AGENT_PIDS), "CODETAINER_TMP_SIZE": SMALL,
           "CODETAINER_WORKSPACE_SIZE": SMALL, "CODETAINER_HOME_SIZE": SMALL}
    binds = (("/dev/kmsg", "/dev/kmsg", True),) if show else ()
    fb = FullBoot(world, base, env=env, cgroups=cgroups.dirs, show_cgroups=show, binds=binds)
    try:
        st = fb.wait_boot()
        assert st["state"] == "READY", st["reasons"]
        fb.wait_session()
        until(lambda: len(fb.status()["session"]["panes"]) == 2, "the monitor's first look")
    except BaseException:
        fb.close()
        raise
    for name, text in (("bomb.py", BOMB), ("hog.py", HOG), ("fill.sh", FILL)):
        (fb.root.out / name).write_text(text)
    return fb


def _machine(show: bool) -> Iterator[FullBoot]:
    """One machine in a world of its own (two would share the inner network namespace)."""
    base = Path(tempfile.mkdtemp(prefix="ct-limits-", dir="/tmp"))
    base.chmod(0o755)
    cgroups = SandboxCgroups(memory=SANDBOX_MEMORY, pids=2 * AGENT_PIDS)
    try:
        with World(ttl=60) as world:
            publish_names(world, default_names())
            fb = boot(base, world, cgroups, show)
            try:
                yield fb
            finally:
                fb.stop()
                fb.close()
    finally:
        cgroups.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cgroup_machine() -> Iterator[FullBoot]:
    yield from _machine(show=True)


@pytest.fixture(scope="module")
def rlimit_machine() -> Iterator[FullBoot]:
    yield from _machine(show=False)


# -- helpers ---------------------------------------------------------------------------------

def pane(fb: FullBoot, role: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in fb.status()["session"]["panes"] if p["role"] == role)
    return found


def type_in(fb: FullBoot, role: str, line: str) -> None:
    """Type ``line`` into the agent's pane ``role``, as the agent (never root's client)."""
    r = fb.inside(*AS_AGENT, "tmux", "-S", SOCK, "send-keys", "-t", pane(fb, role)["id"],
                  line, "Enter")
    assert r.returncode == 0, r.stderr


def proc_file(fb: FullBoot, pid: int, name: str) -> str:
    r = fb.inside("cat", f"/proc/{pid}/{name}")
    assert r.returncode == 0, r.stderr
    return str(r.stdout)


def resolves(fb: FullBoot, name: str = "github.com") -> list[str]:
    r = fb.inside("dig", "+short", "+time=2", "+tries=2", "@127.0.0.53", name, "A")
    return str(r.stdout).split()


def service(fb: FullBoot, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in fb.status()["services"] if s["name"] == name)
    return found


def log_events(fb: FullBoot) -> list[str]:
    return [str(e.get("event")) for e in fb.events()]


# -- the exec chain, at the process limit ----------------------------------------------------

#: no user has it: the process limit below counts only this test's processes
SPARE_UID = 64123
DROP = ("setpriv", f"--reuid={SPARE_UID}", f"--regid={SPARE_UID}", "--clear-groups", "--")
#: as the agent, in builtins until the last command (at the limit nothing can fork; dash
#: gives up with "Cannot fork")
REPORT = 'read adj </proc/self/oom_score_adj; echo "adj=$adj"; ulimit -p; /bin/true'


def test_the_chain_runs_at_the_uids_process_limit_where_a_limit_before_the_drop_cannot(
        tmp_path: Path) -> None:
    """The daemon's tmux clients run as the agent: when the agent's uid is at its limit,
    they must still start. RLIMIT_NPROC is checked against the process's own limit at
    setresuid/execve, so the chain sets it after setpriv."""
    user = AgentUser("spare", SPARE_UID, SPARE_UID, "/")
    held = [subprocess.Popen([*DROP, "sleep", "60"]) for _ in range(8)]
    try:
        until(lambda: sum(1 for p in Path("/proc").iterdir() if p.name.isdigit()
                          and _uid(p) == SPARE_UID) >= 8, "the uid's processes")
        chain = setpriv_argv(user, ["/bin/sh", "-c", REPORT], ExecLimits(1000, 10, 4, ()))
        r = subprocess.run(chain, capture_output=True, text=True, timeout=30, check=False)
        assert r.stdout.split() == ["adj=1000", "4"], r.stderr  # it ran, as the agent
        assert r.returncode == 2 and "Cannot fork" in r.stderr  # and is held to the limit
        before = ["prlimit", "--nproc=4:4", "--", *DROP, "/bin/true"]
        r = subprocess.run(before, capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 126 and "Resource temporarily unavailable" in r.stderr
    finally:
        for proc in held:
            proc.kill()
            proc.wait()
    # a limit that cannot be applied stops the launch: the program never runs
    marker = tmp_path / "ran"
    chain = setpriv_argv(user, ["/bin/sh", "-c", f"echo >{marker}"],
                         ExecLimits(1000, 10, 64, (str(tmp_path / "nothere/cgroup.procs"),)))
    r = subprocess.run(chain, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 126 and "codetainer-limits" in r.stderr and not marker.exists()


def _uid(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None


# -- the limits as booted --------------------------------------------------------------------

def test_the_agents_tree_starts_in_its_cgroup_under_its_limits(cgroup_machine: FullBoot) -> None:
    fb = cgroup_machine
    lim = fb.status()["limits"]
    assert lim["mode"] == "cgroup v1"
    assert limits_mode(lim) == ("cgroup v1 (memory /sys/fs/cgroup/memory/agent, pids "
                                "/sys/fs/cgroup/pids/agent, cpu /sys/fs/cgroup/cpu/agent)")
    cg = lim["cgroup"]
    assert cg["memory"]["max"] == SANDBOX_MEMORY * 75 // 100  # 75 % of the container's
    assert cg["pids"]["max"] == AGENT_PIDS
    assert cg["cpu_weight"] == 20
    assert fb.inside("cat", "/sys/fs/cgroup/cpu/agent/cpu.shares").stdout.strip() == "204"
    assert lim["process"] == {"oom_score_adj": 1000, "nice": 10, "nproc": 2 * AGENT_PIDS,
                              "cgroup_procs": ["/sys/fs/cgroup/cpu/agent/cgroup.procs",
                                               "/sys/fs/cgroup/memory/agent/cgroup.procs",
                                               "/sys/fs/cgroup/pids/agent/cgroup.procs"]}
    session = fb.status()["session"]
    agent_pids = [session["server_pid"], *(p["pid"] for p in session["panes"])]
    for pid in agent_pids:
        groups = proc_file(fb, pid, "cgroup")
        for c in ("memory", "pids", "cpu"):
            line = next(ln for ln in groups.splitlines() if c in ln.split(":")[1].split(","))
            assert line.endswith("/agent"), (pid, line)
        assert proc_file(fb, pid, "oom_score_adj").strip() == "1000"
        assert proc_file(fb, pid, "stat").rsplit(")", 1)[1].split()[16] == "10"  # nice
        assert f"Max processes             {2 * AGENT_PIDS}" in proc_file(fb, pid, "limits")
    # the init, the daemon and the DNS server are not in it, nor under its rlimit
    for pid in (1, fb.status()["daemon"]["pid"], service(fb, "dns")["pid"]):
        assert not any(ln.endswith("/agent") for ln in proc_file(fb, pid, "cgroup").splitlines())
        assert f"Max processes             {2 * AGENT_PIDS} " not in proc_file(fb, pid, "limits")
        assert int(proc_file(fb, pid, "oom_score_adj")) <= 0
    text = subprocess.run([CLI, "--socket", fb.socket, "status"], capture_output=True,
                          text=True, check=False).stdout
    assert "limits\n  cgroup v1 (memory /sys/fs/cgroup/memory/agent" in text
    assert "each agent process: nproc 400, nice 10, oom_score_adj 1000" in text
    assert "OOM kills (the agent's): none" in text


def test_an_oom_kills_the_agent_not_the_machine_and_status_says_so(
        cgroup_machine: FullBoot) -> None:
    fb = cgroup_machine
    st = fb.status()
    keep = {"init": 1, "daemon": st["daemon"]["pid"], "dns": service(fb, "dns")["pid"]}
    restarts = st["session"]["restarts"]["agent"]
    hog = pane(fb, "agent")
    type_in(fb, "agent", "exec python3 /scratch-out/hog.py")

    def killed() -> dict[str, Any] | None:
        oom = fb.status()["limits"]["oom_kills"]
        return oom if oom["count"] >= 1 and oom["command"] else None

    oom = until(killed, "the OOM kill in status", timeout=60)
    assert oom["scope"] == "agent" and oom["command"] == "python3"
    assert oom["source"] == "/sys/fs/cgroup/memory/agent/memory.oom_control"
    assert abs(time.time() - oom["last"]) < 60

    def respawned() -> dict[str, Any] | None:
        s = fb.status()["session"]
        p = next(p for p in s["panes"] if p["role"] == "agent")
        return s if s["restarts"]["agent"] > restarts and not p["dead"] \
            and p["pid"] != hog["pid"] else None

    until(respawned, "the agent respawned after the OOM kill")
    st = fb.status()
    assert {"init": 1, "daemon": st["daemon"]["pid"], "dns": service(fb, "dns")["pid"]} == keep
    assert service(fb, "dns")["state"] == "RUNNING" and service(fb, "dns")["restarts"] == 0
    assert resolves(fb)
    # (the monitor may look between the pane's end and tmux reaping it: no signal then)
    assert [e for e in fb.events() if e.get("event") == "session_agent_exited"
            and e.get("pid") == hog["pid"]]
    assert "agent_oom_killed" in log_events(fb)
    text = subprocess.run([CLI, "--socket", fb.socket, "status"], capture_output=True,
                          text=True, check=False).stdout
    assert "OOM kills (the agent's): 1, last at " in text and "(python3)" in text


# -- fork bombs --------------------------------------------------------------------------------

def bomb_holds_while_the_daemon_works(fb: FullBoot, tag: str, limit: int) -> dict[str, Any]:
    """Start the bomb in the shell pane; while it holds every process it could get, the
    daemon answers, DNS resolves, a killed DNS server comes back and the session monitor
    sees the agent die. Returns the bomb's report."""
    out = fb.root.out
    agent = pane(fb, "agent")
    restarts = fb.status()["session"]["restarts"]["agent"]
    failed_queries = log_events(fb).count("session_query_failed")
    type_in(fb, "shell", f"python3 /scratch-out/bomb.py {tag}")
    report_file = out / f"bomb-{tag}.json"
    killed = False
    try:
        until(report_file.exists, "the bomb to reach its limit", timeout=45)
        report: dict[str, Any] = json.loads(report_file.read_text())
        assert report["error"] == "EAGAIN", report
        assert 0 < report["forked"] <= limit, report
        # at the limit: status answers (the CLI, a fresh process as an operator runs it)
        r = subprocess.run([CLI, "--socket", fb.socket, "status"], capture_output=True,
                           text=True, timeout=30, check=False)
        assert r.returncode == 0 and "READY" in r.stdout.splitlines()[0], r.stdout + r.stderr
        # an allowlisted name resolves, and a killed DNS server is restarted
        assert resolves(fb)
        dns = service(fb, "dns")
        assert fb.inside("kill", "-KILL", str(dns["pid"])).returncode == 0

        def restarted() -> bool:
            now = service(fb, "dns")
            return bool(now["state"] == "RUNNING" and now["pid"] != dns["pid"])

        until(restarted, "the DNS server restarted during the bomb")
        assert until(lambda: resolves(fb), "DNS answering again during the bomb")
        # the session monitor's tmux clients (they run as the agent, at its limit) work:
        # it sees the agent die
        assert fb.inside("kill", "-KILL", str(agent["pid"])).returncode == 0
        killed = True
        until(lambda: [e for e in fb.events() if e.get("event") == "session_agent_exited"
                       and e.get("pid") == agent["pid"]], "the monitor to see the agent die")
        assert log_events(fb).count("session_query_failed") == failed_queries
    finally:
        (out / f"bomb-{tag}.release").write_text("")
    # afterwards the agent comes back (its respawn needs a fork of the agent's own)
    if killed:
        until(lambda: fb.status()["session"]["restarts"]["agent"] > restarts,
              "the agent respawned after the bomb", timeout=60)
    return report


def test_a_fork_bomb_hits_the_agents_pids_cgroup(cgroup_machine: FullBoot) -> None:
    fb = cgroup_machine
    refused = fb.status()["limits"]["cgroup"]["pids"]["refused"] or 0
    report = bomb_holds_while_the_daemon_works(fb, "cgroup", AGENT_PIDS)
    pids = fb.status()["limits"]["cgroup"]["pids"]
    assert pids["refused"] > refused, pids  # the cgroup said no, not the rlimit
    assert report["forked"] >= AGENT_PIDS // 2, report


def test_without_a_cgroup_the_rlimit_holds_and_the_daemons_clients_still_run(
        rlimit_machine: FullBoot) -> None:
    """The process limit is per uid and the daemon's own tmux clients run as the agent:
    they still run at the limit (RLIMIT_NPROC comes after the privilege drop)."""
    fb = rlimit_machine
    lim = fb.status()["limits"]
    assert lim["mode"] == "rlimit only" and lim["cgroup"] is None
    assert limits_mode(lim) == "rlimit only (no writable cgroup: no cgroup filesystem is mounted)"
    assert lim["process"]["nproc"] == AGENT_PIDS and lim["process"]["cgroup_procs"] == []
    assert lim["oom_kills"]["scope"] == "machine"
    bomb_holds_while_the_daemon_works(fb, "rlimit", AGENT_PIDS)


# -- disk ------------------------------------------------------------------------------------

def test_filling_every_agent_mount_leaves_the_daemons_state_alone(
        cgroup_machine: FullBoot) -> None:
    fb = cgroup_machine
    out = fb.root.out
    type_in(fb, "shell", "sh /scratch-out/fill.sh")
    until((out / "fill.done").exists, "the agent filling its mounts", timeout=60)
    rcs = dict(line.split() for line in (out / "fill.rc").read_text().splitlines())
    assert set(rcs) == {"/tmp", "/workspace", "/home/claude", "/run/codetainer/tmux"}
    assert all(rc != "0" for rc in rcs.values()), rcs  # dd stopped: no space left
    assert (out / "fill.dd").read_text().count("No space left on device") == 4
    # the daemon's runtime directory is not the agent's to write, and is its own tmpfs
    assert (out / "fill.run.rc").read_text().strip() != "0"
    assert "Permission denied" in (out / "fill.run").read_text()
    devs = {p: fb.inside("stat", "-c", "%d", p).stdout.strip()
            for p in ("/run/codetainer", *rcs)}
    assert len(set(devs.values())) == len(devs), devs
    assert fb.inside("findmnt", "-n", "-o", "FSTYPE", "/run/codetainer").stdout.strip() == "tmpfs"
    # the daemon still writes its state (a grant rewrites the DNS configuration there) ...
    before = len(fb.events())
    fb.call("allow", target="fill-check.example.org", duration="10m")
    conf = fb.inside("grep", "-rl", "fill-check.example.org", "/run/codetainer/dns")
    assert conf.returncode == 0, conf.stderr
    # ... and its log, and answers
    assert len(fb.events()) > before
    # (the session's usage is sampled at most once a second: wait for a fresh sample)
    def mounts_full() -> dict[str, Any] | None:
        mounts = {m["path"]: m for m in fb.status()["session"]["mounts"]}
        return mounts if all(mounts[p]["warn"] and mounts[p]["percent"] >= 90
                             for p in rcs) else None

    until(mounts_full, "status to show every filled mount", timeout=10)
    text = subprocess.run([CLI, "--socket", fb.socket, "status"], capture_output=True,
                          text=True, check=False).stdout
    full = [ln for ln in text.splitlines() if "FULL SOON" in ln]
    assert len(full) == 4, text
    type_in(fb, "shell", "rm -f " + " ".join(f"{p}/fill" for p in rcs))
