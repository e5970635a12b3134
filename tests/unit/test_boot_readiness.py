"""Readiness: checks grouped by policy, every failure listed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from codetainer.boot import readiness
from codetainer.boot.engine import BootContext, BootEngine, BootState, Policy, StepError
from codetainer.boot.readiness import Check
from codetainer.events import EventBus
from codetainer.settings import Settings


class Services:
    def __init__(self, bad: list[str]) -> None:
        self.bad = bad

    def not_running(self) -> list[str]:
        return self.bad


async def ok(ctx: BootContext) -> str:
    return "fine"


async def broken(ctx: BootContext) -> str:
    raise StepError("answers nothing", "restart it")


async def slow(ctx: BootContext) -> str:
    await asyncio.sleep(5)
    return "late"


def ctx_for(tmp_path: Path, bad: list[str] | None = None) -> BootContext:
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text("{}")
    (home / ".claude.json").write_text(json.dumps(
        {"hasCompletedOnboarding": True,
         "projects": {str(tmp_path / "ws"): {"hasTrustDialogAccepted": True}}}))
    return BootContext(Settings(home=str(home), workspace=str(tmp_path / "ws")), EventBus(),
                       services=Services(bad or []))


def test_steps_split_by_policy() -> None:
    steps = readiness.readiness_steps([Check("dns", Policy.FATAL, ok)])
    assert [(s.name, s.policy) for s in steps] == [
        ("readiness", Policy.FATAL), ("readiness-degraded", Policy.DEGRADED)]
    assert "dns" in steps[0].description and "settings" in steps[0].description
    with pytest.raises(ValueError, match="duplicate"):
        readiness.readiness_steps([Check("settings", Policy.FATAL, ok)])


async def test_all_good_is_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPO_URL", raising=False)
    engine = BootEngine(readiness.readiness_steps(), ctx_for(tmp_path))
    assert await engine.run() is BootState.READY


async def test_every_failure_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPO_URL", "https://github.com/o/r")
    extra = [Check("dns", Policy.FATAL, broken), Check("firewall", Policy.FATAL, slow, 0.1),
             Check("probe", Policy.DEGRADED, broken)]
    engine = BootEngine(readiness.readiness_steps(extra), ctx_for(tmp_path, ["dns", "web"]))
    assert await engine.run() is BootState.FAILED
    fatal = engine.records["readiness"].reason
    assert "dns: answers nothing (restart it)" in fatal
    assert "firewall: no answer within 0.1s" in fatal
    assert "settings" not in fatal
    # a fatal failure skips the degraded checks (they run after)
    assert engine.records["readiness-degraded"].state.value == "SKIPPED"


async def test_degraded_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPO_URL", "https://github.com/o/r")
    engine = BootEngine(readiness.readiness_steps(), ctx_for(tmp_path, ["web"]))
    assert await engine.run() is BootState.DEGRADED
    reason = engine.records["readiness-degraded"].reason
    assert "services: not RUNNING: web" in reason
    assert "repository: REPO_URL is set but" in reason


async def test_settings_check_catches_untrusted_dir(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    ctx.trusted_dirs = [str(tmp_path / "ws" / "repo")]
    with pytest.raises(StepError, match="not trusted"):
        await readiness.check_settings(ctx)


async def test_services_check_needs_a_manager(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    ctx.services = None
    with pytest.raises(StepError, match="no service manager"):
        await readiness.check_services(ctx)
