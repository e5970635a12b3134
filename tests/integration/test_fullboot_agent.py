"""The agent as the real daemon starts it: one whole machine (codetainerd as PID 1 in a
scratch root joined to the test world, every boot step and the session phase), booted
once for this module, with ``REPO_URL`` naming a private fork on a stand-in GitHub
(codetainer/sandbox/fullboot.py ``GitServer``) and marker variables in the daemon's environment.

Everything the agent does here it does in its own tmux panes (``send-keys`` on the
agent socket), so what is tested is exactly what the daemon started: privilege, the
environment, and what the daemon does when the agent or its tmux server dies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from codetainer.boot.privileges import PASSTHROUGH
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import FullBoot, GitServer, machine_with_repo

pytestmark = pytest.mark.integration

GH_PAT = "ghp_AGENTsecret0123456789abc"
OAUTH = "sk-ant-oat01-AGENToauth98765xyz"
SOCK = "/run/codetainer/tmux/agent.sock"
UPSTREAM_URL = "https://github.com/upstream-owner/repo.git"
MARKERS = {"CODETAINER_TEST_MARKER": "leak", "SOME_RANDOM_VAR": "leak"}

#: What an agent process may have in its environment: what ``agent_env`` builds, the
#: daemon-side passthrough list, and what tmux and the shells add themselves.
AGENT_ENV_KEYS = {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "TERM", "COLORTERM",
                  "GH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN", *PASSTHROUGH,
                  "TMUX", "TMUX_PANE", "TERM_PROGRAM", "TERM_PROGRAM_VERSION", "PWD", "OLDPWD",
                  "SHLVL", "_"}

#: Run by the agent in its own pane: try to change the firewall and remount the root
#: (with the tools and with the raw syscall), report what the kernel said. nft is not on
#: the agent's PATH (/usr/sbin): the probe names it, as an agent could.
PROBE = r"""o=/scratch-out/probe-$1
/usr/sbin/nft add table inet evil >$o.nft.out 2>&1; echo $? >$o.nft.rc
mount -o remount,rw / >$o.mount.out 2>&1; echo $? >$o.mount.rc
python3 -I -c 'import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.mount(None, b"/", None, 32, None)  # MS_REMOUNT, without MS_RDONLY: read-write
print(rc, os.strerror(ctypes.get_errno()) if rc else "mounted")' >$o.syscall 2>&1
cat /proc/self/status >$o.status
id -u >$o.uid
echo done >$o.done
"""


def until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    return wait_for(pred, timeout, what)


@pytest.fixture(scope="module")
def machine() -> Iterator[tuple[FullBoot, GitServer]]:
    env = {"CLAUDE_CODE_OAUTH_TOKEN": OAUTH, **MARKERS}
    with machine_with_repo("ct-agent-", GH_PAT, env, forks={"owner/repo": UPSTREAM_URL}) as (
            fb, _, git):
        yield fb, git


def session_status(fb: FullBoot) -> dict[str, Any]:
    session: dict[str, Any] = fb.status()["session"]
    return session


def pane(session: dict[str, Any], role: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in session["panes"] if p["role"] == role)
    return found


def environ(fb: FullBoot, pid: int) -> dict[str, str]:
    r = fb.inside("cat", f"/proc/{pid}/environ")
    assert r.returncode == 0, r.stderr
    return dict(kv.partition("=")[::2] for kv in r.stdout.split("\0") if kv)


def nft_tables(fb: FullBoot) -> list[str]:
    r = fb.inside("nft", "list", "tables")
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_private_fork_is_cloned_with_the_token_and_gets_its_upstream(
        machine: tuple[FullBoot, GitServer]) -> None:
    fb, git = machine
    st = fb.status()
    repo = next(s for s in st["steps"] if s["name"] == "repository")
    assert repo["state"] == "OK"
    assert f"fork of {UPSTREAM_URL}" in repo["reason"]
    stats = git.stats()
    assert stats["auth_ok"].get("/owner/repo.git", 0) > 0, "the clone must send the token"
    assert stats["api_auth_ok"] >= 1, "the fork lookup must authenticate with the token"
    snap = json.loads(fb.inside("cat", "/run/codetainer/remotes.json").stdout)
    assert snap["remotes"] == {"origin": {"url": git.url("/owner/repo.git")},
                               "upstream": {"url": UPSTREAM_URL}}
    assert fb.inside("stat", "-c", "%u %g %a", "/run/codetainer/remotes.json"
                     ).stdout.split() == ["0", "0", "444"]
    # the session runs in the clone, which belongs to the agent
    assert st["session"]["cwd"] == "/workspace/repo"
    assert fb.inside("stat", "-c", "%u", "/workspace/repo/README.md").stdout.strip() == "1000"
    # the token is where it must be and nowhere else a test can see
    assert GH_PAT not in json.dumps(snap) and GH_PAT not in json.dumps(st)
    assert GH_PAT not in fb.inside("cat", "/workspace/repo/.git/config").stdout
    log = fb.log()
    assert '"event": "upstream_added"' in log and '"event": "repository_ready"' in log
    assert GH_PAT not in log and OAUTH not in log


@pytest.mark.parametrize("role", ["agent", "shell"])
def test_agent_cannot_change_the_firewall_or_remount(machine: tuple[FullBoot, GitServer],
                                                      role: str) -> None:
    fb, _git = machine
    out = fb.root.out
    (out / "probe.sh").write_text(PROBE)
    (out / "probe.sh").chmod(0o644)
    tables = nft_tables(fb)
    assert "table inet codetainer" in tables
    target = pane(session_status(fb), role)
    assert not target["dead"]
    r = fb.inside("tmux", "-S", SOCK, "send-keys", "-t", target["id"],
                  f"sh /scratch-out/probe.sh {role}", "Enter")
    assert r.returncode == 0, r.stderr
    o = f"probe-{role}"
    until(lambda: (out / f"{o}.done").exists(), what=f"the probe ran in the {role} pane")
    assert (out / f"{o}.uid").read_text().strip() == "1000"
    assert (out / f"{o}.nft.rc").read_text().strip() != "0"
    assert "Operation not permitted" in (out / f"{o}.nft.out").read_text()
    assert (out / f"{o}.mount.rc").read_text().strip() != "0"
    # libmount's words for the EPERM its mount(2) got; the raw syscall says it plainly
    assert "must be superuser to use mount" in (out / f"{o}.mount.out").read_text()
    assert (out / f"{o}.syscall").read_text().split(None, 1) == ["-1", "Operation not permitted\n"]
    text = (out / f"{o}.status").read_text()
    assert "NoNewPrivs:\t1\n" in text and "CapBnd:\t0000000000000000\n" in text
    status = {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}
    assert status["CapEff"] == status["CapPrm"] == status["CapAmb"] == "0000000000000000"
    assert status["Groups"] == "", "supplementary groups must be cleared"
    assert status["Uid"].split() == ["1000"] * 4
    # nothing changed: same tables, root still read-only
    assert nft_tables(fb) == tables
    assert "evil" not in fb.inside("nft", "list", "ruleset").stdout
    assert fb.inside("findmnt", "-n", "-o", "OPTIONS", "/").stdout.startswith("ro")


def test_agent_environment_is_built_from_the_allowlist(
        machine: tuple[FullBoot, GitServer]) -> None:
    fb, git = machine
    # the markers did reach the daemon (the init, PID 1, keeps its environment) ...
    init_env = environ(fb, 1)
    assert {k: init_env.get(k) for k in MARKERS} == MARKERS
    session = session_status(fb)
    pids = {"agent": pane(session, "agent")["pid"], "shell": pane(session, "shell")["pid"],
            "tmux server": session["server_pid"]}
    for what, pid in pids.items():
        env = environ(fb, pid)
        # ... and none of the daemon's own environment reaches the agent's processes
        assert not set(MARKERS) & set(env), f"{what} inherited the daemon's environment"
        assert set(env) <= AGENT_ENV_KEYS, f"{what}: not on the allowlist: " \
                                           f"{sorted(set(env) - AGENT_ENV_KEYS)}"
        assert not [k for k in env if k.startswith("CODETAINER_")], what
        assert "GH_PAT" not in env, what
        assert env["HOME"] == "/home/claude" and env["USER"] == "claude", what
        assert env["LOGNAME"] == "claude", what
        assert env["PATH"].startswith("/home/claude/.local/bin:"), what
        assert env["REPO_URL"] == git.url("/owner/repo.git"), what
        # the agent's tools need these (and only the agent's processes have them)
        assert env["GH_TOKEN"] == GH_PAT and env["CLAUDE_CODE_OAUTH_TOKEN"] == OAUTH, what
        assert fb.inside("stat", "-c", "%u", f"/proc/{pid}").stdout.strip() == "1000", what


def test_no_process_but_the_agents_holds_a_secret(machine: tuple[FullBoot, GitServer]) -> None:
    fb, _git = machine
    r = fb.inside("sh", "-c", 'for p in /proc/[0-9]*; do [ "$(stat -c %u $p)" = 1000 ] || '
                  '{ printf "%s %s " "${p#/proc/}" "$(cat $p/comm)"; tr "\\0" " " '
                  '< $p/environ; echo; }; done')
    lines = r.stdout.splitlines()
    assert len(lines) >= 3 and any(" coredns " in ln for ln in lines), "services were read"
    leaks = [" ".join(ln.split()[:2]) for ln in lines if GH_PAT in ln or OAUTH in ln]
    assert leaks == [], f"secrets in the environment of {leaks}"


def test_dead_agent_is_respawned_and_lost_server_recreated_both_counted(
        machine: tuple[FullBoot, GitServer]) -> None:
    fb, _git = machine
    before = session_status(fb)
    restarts = dict(before["restarts"])
    agent = pane(before, "agent")
    assert fb.inside("kill", "-KILL", str(agent["pid"])).returncode == 0

    def respawned() -> dict[str, Any] | None:
        s = session_status(fb)
        p = pane(s, "agent")
        if s["restarts"]["agent"] == restarts["agent"] + 1 and not p["dead"] and \
                p["pid"] not in (None, agent["pid"]):
            return s
        return None

    after = until(respawned, what="agent pane respawned and counted")
    new_agent = pane(after, "agent")
    assert new_agent["id"] == agent["id"], "the same pane is respawned"
    assert fb.inside("stat", "-c", "%u", f"/proc/{new_agent['pid']}").stdout.strip() == "1000"
    env = environ(fb, new_agent["pid"])  # respawned by a tmux client the daemon runs
    assert set(env) <= AGENT_ENV_KEYS, sorted(set(env) - AGENT_ENV_KEYS)
    assert env["PATH"].startswith("/home/claude/.local/bin:"), "the daemon's PATH leaked"
    assert env["GH_TOKEN"] == GH_PAT
    assert after["restarts"]["server"] == restarts["server"]

    server = after["server_pid"]
    assert fb.inside("kill", "-KILL", str(server)).returncode == 0

    def recreated() -> dict[str, Any] | None:
        s = session_status(fb)
        if s["restarts"]["server"] == restarts["server"] + 1 and s["state"] == "RUNNING" \
                and s["server_pid"] not in (None, server) and len(s["panes"]) == 2:
            return s
        return None

    final = until(recreated, what="tmux server and session recreated and counted")
    assert final["restarts"] == {"agent": restarts["agent"] + 1,
                                 "server": restarts["server"] + 1}
    assert fb.session()["exists"]
    listed = fb.inside("tmux", "-S", SOCK, "list-panes", "-s", "-t", final["id"], "-F",
                       "#{pane_pid}").stdout.split()
    assert [str(p["pid"]) for p in final["panes"]] == listed
    events = [e.get("event") for e in fb.events()]
    for name in ("session_agent_exited", "session_respawned", "session_lost",
                 "session_recreated"):
        assert name in events, name
