"""Claude Code settings: template rendering, onboarding and trust in ~/.claude.json."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from codetainer.boot import agent_settings
from codetainer.boot.engine import StepError
from codetainer.boot.privileges import AgentUser

TEMPLATE = '{"statusLine": {"type": "command", "command": "{{HOOKS_DIR}}/statusline"}}'


def test_placeholder_replaced_json_safely() -> None:
    data = agent_settings.render_settings(TEMPLATE, '/opt/code "tainer"/hooks')
    assert data["statusLine"]["command"] == '/opt/code "tainer"/hooks/statusline'


def test_bad_template_names_the_file_and_line() -> None:
    with pytest.raises(StepError, match=r"t.json is not valid JSON \(line 2"):
        agent_settings.render_settings('{\n"a": }', "/h", "t.json")
    with pytest.raises(StepError, match="must hold a JSON object"):
        agent_settings.render_settings("[]", "/h", "t.json")


def test_trusted_dirs() -> None:
    assert agent_settings.trusted_dirs("/workspace", None) == ["/workspace"]
    assert agent_settings.trusted_dirs("/workspace", "https://github.com/o/r") == [
        "/workspace/repo", "/workspace"]


def test_merge_keeps_existing_fields() -> None:
    existing = {"theme": "dark", "projects": {"/workspace": {"allowedTools": ["x"]}}}
    merged = agent_settings.merge_claude_json(existing, ["/workspace"], skip_permissions=True)
    assert merged["theme"] == "dark"
    assert merged["hasCompletedOnboarding"] is True
    assert merged["bypassPermissionsModeAccepted"] is True
    assert merged["projects"]["/workspace"] == {
        "allowedTools": ["x"], "hasTrustDialogAccepted": True,
        "hasCompletedProjectOnboarding": True}
    plain = agent_settings.merge_claude_json({}, [], skip_permissions=False)
    assert "bypassPermissionsModeAccepted" not in plain


def test_install_writes_both_files(tmp_path: Path) -> None:
    tpl = tmp_path / "hooks" / "settings.template.json"
    tpl.parent.mkdir()
    tpl.write_text(TEMPLATE)
    home = tmp_path / "home"
    home.mkdir()
    user = AgentUser("me", os.getuid(), os.getgid(), str(home))
    settings_file, claude_json = agent_settings.install(
        tpl, tpl.parent, home, user, dirs=["/workspace"], skip_permissions=False)
    assert json.loads(settings_file.read_text())["statusLine"]["command"] == (
        f"{tpl.parent}/statusline")
    data = json.loads(claude_json.read_text())
    assert data["projects"]["/workspace"]["hasTrustDialogAccepted"] is True
    assert stat.S_IMODE(claude_json.stat().st_mode) == 0o600


def test_missing_template_is_explained(tmp_path: Path) -> None:
    user = AgentUser("me", os.getuid(), os.getgid(), str(tmp_path))
    with pytest.raises(StepError, match=r"settings\.template\.json is missing"):
        agent_settings.install(tmp_path / "hooks" / "settings.template.json", tmp_path,
                               tmp_path, user, dirs=[], skip_permissions=False)
