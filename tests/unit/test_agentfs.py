"""Root reading files the agent could have replaced: links refused, FIFOs never block."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from codetainer.agentfs import UnsafePath, read_beneath
from codetainer.boot.engine import StepError
from codetainer.boot.readiness import check_settings

from tests.unit.test_boot_readiness import ctx_for


def test_plain_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("hello")
    assert read_beneath(str(tmp_path), "a/f") == b"hello"


def test_symlinked_file_is_refused_and_target_untouched(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret")
    home = tmp_path / "home"
    home.mkdir()
    (home / "f").symlink_to(secret)
    with pytest.raises(UnsafePath, match="symlink"):
        read_beneath(str(home), "f")


def test_symlinked_directory_component_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "settings.json").write_text("{}")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".claude").symlink_to(real)
    with pytest.raises(UnsafePath, match="symlink"):
        read_beneath(str(home), ".claude/settings.json")


def test_fifo_does_not_block_and_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f")
    with pytest.raises(UnsafePath, match="not a regular file"):
        read_beneath(str(tmp_path), "f")


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 2048)
    with pytest.raises(UnsafePath, match="over 1024 bytes"):
        read_beneath(str(tmp_path), "big", limit=1024)


@pytest.mark.parametrize("rel", ["../etc/passwd", "/etc/passwd", "a/../../b", ""])
def test_escaping_paths_are_refused(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UnsafePath):
        read_beneath(str(tmp_path), rel)


async def test_readiness_refuses_settings_the_agent_swapped_for_links(tmp_path: Path) -> None:
    """The readiness check runs after plugin installs (agent code): a settings file made a
    link to a root-only file, or to a FIFO, fails the check; it never reads through it."""
    ctx = ctx_for(tmp_path)
    home = Path(ctx.settings.home)
    assert await check_settings(ctx) == "settings present"
    secret = tmp_path / "root-only.json"
    secret.write_text(json.dumps({"hasCompletedOnboarding": True, "projects": {}}))
    (home / ".claude.json").unlink()
    (home / ".claude.json").symlink_to(secret)
    with pytest.raises(StepError, match="symlink"):
        await check_settings(ctx)
    (home / ".claude.json").unlink()
    os.mkfifo(home / ".claude.json")
    with pytest.raises(StepError, match="not a regular file"):
        await check_settings(ctx)


async def test_readiness_survives_settings_of_the_wrong_shape(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    claude_json = Path(ctx.settings.home, ".claude.json")
    for bad in ("[]", '{"hasCompletedOnboarding": true, "projects": []}',
                '{"hasCompletedOnboarding": true, "projects": {"x": 1}}'):
        claude_json.write_text(bad)
        with pytest.raises(StepError):
            await check_settings(ctx)


async def test_checkout_hand_over_never_follows_a_committed_symlink(tmp_path: Path) -> None:
    """A repository can carry symlinks (to /etc/shadow, to a directory outside): the
    hand-over to the agent changes the links themselves, never their targets."""
    from codetainer.boot.privileges import AgentUser
    from codetainer.boot.repository import hand_over

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_text("root only")
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "sub" / "file").write_text("x")
    (repo / "link-to-file").symlink_to(outside / "shadow")
    (repo / "link-to-dir").symlink_to(outside)
    await hand_over(repo, AgentUser("claude", 1000, 1000, "/h"))
    for p in (repo, repo / "sub", repo / "sub" / "file", repo / "link-to-file", repo / "link-to-dir"):
        assert os.lstat(p).st_uid == 1000, p
    for p in (outside, outside / "shadow"):
        assert os.lstat(p).st_uid == 0, p


def test_root_writes_into_agent_places_only_before_agent_code_runs() -> None:
    """Every boot step that writes into the agent's home, workspace or repository as root
    comes before the first step that runs agent-side code (plugin installs), and the
    session starts after the whole boot."""
    from codetainer.boot.plan import all_steps
    from codetainer.events import EventBus
    from codetainer.network.controller import NetworkController
    from codetainer.settings import Settings

    settings = Settings()
    network = NetworkController(settings, EventBus(), None)  # type: ignore[arg-type]
    names = [s.name for s in all_steps(settings, network)]
    writers = ("filesystem", "credentials", "agent-settings", "repository")
    first_agent_code = names.index("plugins")
    assert all(names.index(w) < first_agent_code for w in writers), names
    assert names.index("readiness") > first_agent_code  # hence read_beneath there
