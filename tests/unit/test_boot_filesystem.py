"""Filesystem: tmpfs plan, home skeleton, shell prompt, mountinfo parsing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from codetainer.boot import filesystem
from codetainer.boot.privileges import AgentUser
from codetainer.settings import Settings, SettingsError

USER = AgentUser("claude", 1000, 1000, "/home/claude")


def test_tmpfs_plan_defaults() -> None:
    plan = filesystem.tmpfs_plan(Settings(), USER)
    assert [(t.path, t.size, t.mode, t.uid) for t in plan] == [
        ("/workspace", "512m", 0o755, 1000), ("/tmp", "512m", 0o1777, 0),
        ("/home/claude", "1g", 0o750, 1000), ("/run/codetainer/tmux", "4m", 0o700, 1000)]
    assert plan[0].data == "size=512m,mode=0755,uid=1000,gid=1000"
    assert plan[1].data == "size=512m,mode=1777,uid=0,gid=0"
    # the agent's tmux directory gets its own small tmpfs: filling it leaves the daemon's
    # runtime directory around it alone
    assert plan[3].data == "size=4m,mode=0700,uid=1000,gid=1000,nr_inodes=256"


def test_tmux_directory_outside_the_run_dir_gets_no_mount() -> None:
    plan = filesystem.tmpfs_plan(Settings(tmux_socket="/tmp/agent.sock"), USER)
    assert [t.path for t in plan] == ["/workspace", "/tmp", "/home/claude"]


@pytest.mark.parametrize("size", ["", "0", "12x", "1g,uid=0", "-1m", "100%%"])
def test_bad_size_names_the_variable(size: str) -> None:
    # checked when the settings are parsed (codetainerd exits 64), before any mount
    with pytest.raises(SettingsError) as err:
        filesystem.tmpfs_plan(Settings(home_size=size or " "), USER)
    assert "CODETAINER_HOME_SIZE" in str(err.value)


def test_home_skeleton_and_links(tmp_path: Path) -> None:
    home, bins = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bins.mkdir()
    (bins / "claude").write_text("")
    skipped = filesystem.write_home(home, os.getuid(), os.getgid(), bins)
    for d in filesystem.HOME_DIRS:
        assert (home / d).is_dir()
    assert os.readlink(home / ".local/bin/claude") == str(bins / "claude")
    assert not (home / ".bun/bin/bun").exists()
    assert skipped == [f".bun/bin/bun ({bins}/bun is absent)",
                       f".bun/bin/bunx ({bins}/bunx is absent)"]
    assert 'export GOPATH="$HOME/go"' in (home / ".bashrc").read_text()
    assert ". \"$HOME/.bashrc\"" in (home / ".profile").read_text()
    assert (home.stat().st_mode & 0o777) == 0o750


def test_prompt_shows_repo_relative_path_and_branch(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    filesystem.write_home(home, os.getuid(), os.getgid(), tmp_path)
    repo = tmp_path / "my$(touch pwned)repo"
    (repo / "src" / "pkg").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "feature/x", str(repo)], check=True)
    out = subprocess.run(
        ["bash", "--rcfile", str(home / ".bashrc"), "-i", "-c", '__ct_prompt; printf "%s" "$PS1"'],
        cwd=repo / "src" / "pkg", capture_output=True, text=True,
        env={"HOME": str(home), "PATH": os.environ["PATH"], "TERM": "dumb"}, check=True).stdout
    assert "my\\$(touch pwned)repo/src/pkg" in out
    assert "(feature/x)" in out
    assert not (repo / "src" / "pkg" / "pwned").exists()


def test_mountinfo_parsing(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
        "30 22 0:40 / /work\\040space rw,nosuid,nodev shared:5 - tmpfs tmpfs "
        "rw,size=524288k,mode=755,uid=1000,gid=1000\n"
        "31 22 0:41 / / ro,relatime - tmpfs scratch rw\n")
    ms = filesystem.mounts(str(info))
    assert [m.mountpoint for m in ms] == ["/", "/work space", "/"]
    ws = ms[1]
    assert ws.fstype == "tmpfs" and not ws.readonly
    assert ws.super_option("size") == "524288k" and ws.super_option("uid") == "1000"
    assert ms[2].readonly


def test_mount_of_finds_the_holding_mount() -> None:
    assert filesystem.mount_of("/proc/self").fstype == "proc"
    assert filesystem.mount_at("/proc") is not None
    assert filesystem.mount_at("/proc/self") is None


def test_writable_probe(tmp_path: Path) -> None:
    assert filesystem.writable([str(tmp_path), "/proc"]) == {str(tmp_path): True, "/proc": False}
    assert list(tmp_path.iterdir()) == []
