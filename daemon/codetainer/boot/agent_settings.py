"""Boot step ``agent-settings``: Claude Code starts straight into work.

- ``~/.claude/settings.json`` from the project's ``hooks/settings.template.json``, with
  ``{{HOOKS_DIR}}`` replaced by the installed hooks directory (the result must be JSON).
- ``~/.claude.json``: onboarding complete (``hasCompletedOnboarding``), the
  ``--dangerously-skip-permissions`` disclaimer accepted when the agent command uses
  that flag (``bypassPermissionsModeAccepted``; without it Claude Code stops on a
  dialog only a person can dismiss), and the working directories pre-trusted
  (``projects.<dir>.hasTrustDialogAccepted``): ``/workspace/repo`` when a repository is
  to be cloned, and ``/workspace`` always (the fallback when the clone fails).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import structlog

from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.filesystem import write_file
from codetainer.boot.privileges import AgentUser

log = structlog.get_logger("codetainer.boot")

PLACEHOLDER = "{{HOOKS_DIR}}"
TEMPLATE = ("hooks", "settings.template.json")
SKIP_PERMISSIONS_FLAG = "--dangerously-skip-permissions"


def render_settings(template: str, hooks_dir: str, source: str = "template") -> dict[str, Any]:
    """The template with the hooks directory filled in, parsed (and so validated)."""
    text = template.replace(PLACEHOLDER, json.dumps(hooks_dir)[1:-1])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StepError(f"{source} is not valid JSON (line {exc.lineno}: {exc.msg})",
                        f"fix {source}") from None
    if not isinstance(data, dict):
        raise StepError(f"{source} must hold a JSON object", f"fix {source}")
    return data


def trusted_dirs(workspace: str, repo_url: str | None) -> list[str]:
    dirs = [os.path.join(workspace, "repo")] if repo_url else []
    return [*dirs, workspace]


def merge_claude_json(existing: dict[str, Any], dirs: list[str],
                      skip_permissions: bool) -> dict[str, Any]:
    data = dict(existing)
    data["hasCompletedOnboarding"] = True
    if skip_permissions:
        data["bypassPermissionsModeAccepted"] = True
        # 2.1.330 asks once, under --dangerously-skip-permissions, whether auto mode
        # should become the default ("Make auto mode your default permission mode?"), a
        # dialog that would hold CLAUDE_PROMPT until a human answers; this is where the
        # CLI records the answer "No, keep bypass permissions" (seen by answering it).
        data["hasSeenAutoDefaultNudge"] = True
    projects = dict(data.get("projects") or {})
    for d in dirs:
        entry = dict(projects.get(d) or {})
        entry["hasTrustDialogAccepted"] = True
        entry["hasCompletedProjectOnboarding"] = True
        projects[d] = entry
    data["projects"] = projects
    return data


def _write_json(path: Path, data: dict[str, Any], user: AgentUser, mode: int) -> None:
    write_file(path, json.dumps(data, indent=2) + "\n", mode, user.uid, user.gid)


def install(template_path: Path, hooks_dir: Path, home: Path, user: AgentUser, *,
            dirs: list[str], skip_permissions: bool) -> tuple[Path, Path]:
    try:
        template = template_path.read_text()
    except FileNotFoundError:
        raise StepError(f"{template_path} is missing",
                        "the image must ship hooks/settings.template.json "
                        "(CODETAINER_ROOT points at the project)") from None
    settings = render_settings(template, str(hooks_dir), str(template_path))
    settings_file = home / ".claude" / "settings.json"
    _write_json(settings_file, settings, user, 0o644)
    os.lchown(settings_file.parent, user.uid, user.gid)

    claude_json = home / ".claude.json"
    existing: dict[str, Any] = {}
    if claude_json.exists():
        try:
            loaded = json.loads(claude_json.read_text())
            existing = loaded if isinstance(loaded, dict) else {}
        except (OSError, json.JSONDecodeError):
            log.warning("claude_json_replaced", path=str(claude_json), reason="not valid JSON")
    _write_json(claude_json, merge_claude_json(existing, dirs, skip_permissions), user, 0o600)
    return settings_file, claude_json


async def _run(ctx: BootContext) -> str:
    s = ctx.settings
    user = ctx.agent()
    dirs = trusted_dirs(s.workspace, os.environ.get("REPO_URL"))
    settings_file, _ = install(
        s.path(*TEMPLATE), s.path("hooks"), Path(s.home), user, dirs=dirs,
        skip_permissions=SKIP_PERMISSIONS_FLAG in s.agent_command.split(),
    )
    ctx.trusted_dirs = dirs
    log.info("agent_settings_installed", settings=str(settings_file), trusted=dirs)
    return f"{settings_file}; trusted {', '.join(dirs)}"


def agent_settings_step() -> Step:
    return Step("agent-settings", _run, timeout=5.0, policy=Policy.FATAL,
                requires=("filesystem",),
                description="Claude Code settings, onboarding done, working directory trusted")
