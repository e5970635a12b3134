"""The attach file (session/attachfile.py): what it says, read back by sh as the front
reads it, and that it exists exactly while the session runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from codetainer.boot import chain
from codetainer.boot.privileges import AgentUser, ExecLimits
from codetainer.boot.seccomp import filter_hex
from codetainer.session import attachfile
from codetainer.session.tmux import SessionState
from codetainer.session.tmuxctl import TmuxGone

from tests.unit.test_session_manager import Clock, FakeManager, clock, snap  # noqa: F401

USER = AgentUser("claude", 1000, 1000, "/home/it's here")
LIMITS = ExecLimits(1000, 10, 300, ("/sys/fs/cgroup/pids/agent/cgroup.procs",))


def sourced(path: Path) -> tuple[str, str, str]:
    """The three values as the front gets them (``. file`` in sh)."""
    r = subprocess.run(["sh", "-c", '. "$1" && printf "%s\\0%s\\0%s" "$ct_attach" "$ct_home" '
                        '"$ct_command"', "sh", str(path)], capture_output=True, text=True,
                       check=True)
    flag, home, command = r.stdout.split("\0")
    return flag, home, command


def sync(path: Path, user: AgentUser | None, pane: str | None = "%0") -> None:
    attachfile.sync(str(path), user, limits=LIMITS, tmux="/usr/bin/tmux",
                    socket="/run/x/tmux/agent.sock", session_id="$3", agent_pane=pane)


def test_the_file_is_the_chain_quoted_for_sh(tmp_path: Path) -> None:
    path = tmp_path / attachfile.FILE_NAME
    sync(path, USER)
    assert path.stat().st_mode & 0o777 == 0o600
    tmux = ["/usr/bin/tmux", "-u", "-S", "/run/x/tmux/agent.sock", "attach-session", "-t",
            "$3", ";", "select-pane", "-t", "%0"]
    assert sourced(path) == ("1", "/home/it's here", chain.agent_script(
        1000, 1000, tmux, filter_hex=filter_hex(), oom_score_adj=1000, nice=10, nproc=300,
        cgroup_procs=LIMITS.cgroup_procs))
    # the script is what sh runs: the prologue, then setpriv, the loader, tmux
    assert sourced(path)[2].startswith("set -- 1000 /sys/fs/cgroup/pids/agent/cgroup.procs -- ")


def test_a_session_going_away_removes_it_and_a_write_that_fails_leaves_none(
        tmp_path: Path) -> None:
    path = tmp_path / attachfile.FILE_NAME
    sync(path, USER)
    sync(path, None)
    assert not path.exists()
    sync(tmp_path / "missing-dir" / attachfile.FILE_NAME, USER)  # logged, not raised
    assert not (tmp_path / "missing-dir").exists()


def test_a_rewrite_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / attachfile.FILE_NAME
    sync(path, USER)
    before = path.stat().st_ino
    sync(path, USER, pane="%7")
    assert path.stat().st_ino != before  # a new file renamed over, never written in place
    assert "select-pane -t %7" in sourced(path)[2]
    assert [p.name for p in tmp_path.iterdir()] == [attachfile.FILE_NAME]  # no temporary left


@pytest.mark.usefixtures("clock")
async def test_it_exists_exactly_while_the_session_runs(tmp_path: Path, clock: Clock) -> None:  # noqa: F811
    path = tmp_path / attachfile.FILE_NAME
    m = FakeManager(attach_file=str(path))
    await m.start()
    assert m.state is SessionState.RUNNING and "-t '$0'" in sourced(path)[2]
    m.next = snap(panes=("%1",))  # the agent pane closed: a new one (%9) is put on top
    await m.check()
    assert m.agent_pane == "%9" and "select-pane -t %9" in sourced(path)[2]
    m.create_failures = 10
    m.next = TmuxGone("no server running")  # lost, and not coming back yet
    await m.check()
    assert m.state is SessionState.RECOVERING and not path.exists()
    m.create_failures = 0
    clock.now += 60
    await m.check()
    assert m.state is SessionState.RUNNING and "-t '$1'" in sourced(path)[2]
    await m.stop()
    assert not path.exists()
    assert os.listdir(tmp_path) == []
