"""``REPO_URL`` through the real daemon: a whole machine (codetainerd as PID 1, every boot
step and the session phase) per test, cloning from the git server of codetainer/sandbox/fullboot.py
(``GitServer``, on loopback of the machine's network namespace).

The machines run one after the other in one test world: each is stopped (and its log
read in full) before the next boots.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.sandbox.fullboot import FullBoot, GitServer, default_names, publish_names
from codetainer.sandbox.world import World

pytestmark = pytest.mark.integration

GH_PAT = "ghp_REPOsecret0123456789abcdef"
OAUTH = "sk-ant-oat01-REPOoauth98765xyz"
EMBEDDED_USER = "embuser"
EMBEDDED_PW = "embeddedPW-7e1f4242xyz"


@pytest.fixture(scope="module")
def place() -> Iterator[tuple[World, GitServer, Path]]:
    base = Path(tempfile.mkdtemp(prefix="ct-repo-", dir="/tmp"))
    base.chmod(0o755)
    try:
        with World(ttl=60) as world:
            publish_names(world, default_names())
            git = GitServer(world, base, token=GH_PAT,
                            auth={"owner": ("x-access-token", GH_PAT),
                                  "emb": (EMBEDDED_USER, EMBEDDED_PW)}, forks={})
            yield world, git, base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def step(status: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in status["steps"] if s["name"] == name)
    return found


def boot(place: tuple[World, GitServer, Path], name: str, repo_url: str) -> FullBoot:
    world, git, base = place
    (base / name).mkdir()
    (base / name).chmod(0o755)
    env = {"GH_PAT": GH_PAT, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH, "REPO_URL": repo_url,
           **git.settings()}
    return FullBoot(world, base / name, env=env)


def stopped_log(fb: FullBoot) -> tuple[str, list[str]]:
    """Stop the machine, then the whole log: (text, event names); asserts it is a real log."""
    assert fb.stop() == 0
    text = fb.log()
    events = [e.get("event", "") for e in fb.events()]
    assert len(events) > 20 and len(events) == len(text.splitlines()), "not a JSON log"
    for name in ("daemon_started", "secrets_loaded", "boot_step_ok", "session_ready",
                 "session_stopped", "shutdown_complete"):
        assert name in events, f"{name} missing from the log"
    return text, events


def test_clone_that_fails_is_degraded_naming_why_and_the_agent_still_starts(
        place: tuple[World, GitServer, Path]) -> None:
    _world, git, _base = place
    url = git.url("/missing/repo.git")
    fb = boot(place, "missing", url)
    try:
        st = fb.wait_boot()
        assert st["state"] == "DEGRADED", st["reasons"]
        repo = step(st, "repository")
        assert repo["state"] == "DEGRADED"
        assert repo["reason"].startswith(f"clone of {url} failed: ")
        assert "not found" in repo["reason"]
        assert "REPO_URL" in (repo["hint"] or "")
        assert any(r.startswith("repository: clone of") for r in st["reasons"]), st["reasons"]
        assert "repository" in step(st, "readiness-degraded")["reason"]
        assert step(st, "readiness")["state"] == "OK"
        assert git.stats()["info_refs"].get("/missing/repo.git") == 1, "not found is final"
        # policy degraded: the agent's session starts anyway, in the empty workspace
        info = fb.wait_session()
        assert info["state"] == "RUNNING"
        session = fb.status()["session"]
        assert session["cwd"] == "/workspace"
        assert [p["role"] for p in session["panes"]] == ["agent", "shell"]
        assert fb.inside("stat", "-c", "%u", f"/proc/{session['panes'][0]['pid']}"
                         ).stdout.strip() == "1000"
        assert fb.inside("test", "-e", "/workspace/repo").returncode != 0
        assert fb.inside("test", "-e", "/run/codetainer/remotes.json").returncode != 0
        text, events = stopped_log(fb)
        assert "clone_failed" in events and "boot_step_degraded" in events
        assert GH_PAT not in text and OAUTH not in text
    finally:
        fb.close()


def test_embedded_credentials_are_used_for_the_clone_and_stripped_everywhere(
        place: tuple[World, GitServer, Path]) -> None:
    _world, git, _base = place
    url = git.url("/emb/repo.git", f"{EMBEDDED_USER}:{EMBEDDED_PW}")
    clean = git.url("/emb/repo.git")
    fb = boot(place, "embedded", url)
    try:
        st = fb.wait_boot()
        assert st["state"] == "READY", st["reasons"]
        assert git.stats()["auth_ok"].get("/emb/repo.git", 0) > 0, \
            "the clone must authenticate with the credentials from REPO_URL"
        assert step(st, "repository")["reason"].startswith(f"cloned {clean} into /workspace/repo")
        snap = json.loads(fb.inside("cat", "/run/codetainer/remotes.json").stdout)
        assert snap["remotes"] == {"origin": {"url": clean}}
        info = fb.wait_session()
        st = fb.status()
        session = st["session"]
        assert session["cwd"] == "/workspace/repo"
        # the agent sees REPO_URL without the credentials
        agent = fb.inside("cat", f"/proc/{session['panes'][0]['pid']}/environ").stdout
        assert f"REPO_URL={clean}\0" in agent
        # the password is nowhere: status, session, argv, environments, files
        for value in (EMBEDDED_PW, f"{EMBEDDED_USER}:"):
            assert value not in json.dumps(st) and value not in json.dumps(info)
        cmdlines = fb.inside("sh", "-c", "cat /proc/[0-9]*/cmdline").stdout
        assert len(cmdlines) > 100 and "codetainerd" in cmdlines
        assert EMBEDDED_PW not in cmdlines
        # the init, the daemon and the agent's processes (the supervised services are
        # test_fullboot_agent.py::test_no_process_but_the_agents_holds_a_secret)
        pids = {1, st["daemon"]["pid"], session["server_pid"],
                *(p["pid"] for p in session["panes"])}
        environs = fb.inside("cat", *(f"/proc/{p}/environ" for p in sorted(pids))).stdout
        assert environs.count("HOME=") == len(pids) == 5, "every environment was read"
        assert EMBEDDED_PW not in environs
        files = fb.inside("grep", "-rlF", "-e", EMBEDDED_PW, "/etc", "/run", "/workspace",
                          "/tmp", "/home", "/root")
        assert files.returncode == 1 and files.stdout == "", files.stdout
        assert EMBEDDED_PW not in fb.inside("cat", "/workspace/repo/.git/config").stdout
        text, events = stopped_log(fb)
        assert "repo_url_credentials_stripped" in events and "repository_ready" in events
        assert clean in text, "the log names the (stripped) URL"
        assert EMBEDDED_PW not in text and GH_PAT not in text and OAUTH not in text
    finally:
        fb.close()
