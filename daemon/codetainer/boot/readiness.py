"""Boot steps ``readiness`` and ``readiness-degraded``: the final proof before READY.

A check is (name, policy, async fn that returns a short note or raises StepError). Checks
of each policy run concurrently inside one step, so every failure is listed, never just
the first: ``readiness`` holds the fatal checks (any failure: FAILED), and
``readiness-degraded`` the others (any failure: DEGRADED). Built in here: the agent's
settings are present, the repository is present when ``REPO_URL`` asked for one, and all
autostart services are RUNNING. The network issue adds DNS and firewall checks.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from codetainer.agentfs import read_beneath
from codetainer.boot.engine import BootContext, Policy, Step, StepError

CheckFn = Callable[[BootContext], Awaitable[str | None]]


@dataclass(frozen=True)
class Check:
    name: str
    policy: Policy
    fn: CheckFn
    timeout: float = 5.0


async def check_settings(ctx: BootContext) -> str:
    home = ctx.settings.home
    claude_json = Path(home, ".claude.json")
    # Agent code has run by now (plugin installs): read without following its links.
    try:
        json.loads(read_beneath(home, ".claude/settings.json"))
        data = json.loads(read_beneath(home, ".claude.json"))
    except (OSError, ValueError) as exc:
        raise StepError(f"agent settings unreadable: {exc}",
                        "the agent-settings step must have run") from None
    if not isinstance(data, dict):
        raise StepError(f"{claude_json}: not a JSON object", "the agent-settings step must have run")
    if data.get("hasCompletedOnboarding") is not True:
        raise StepError(f"{claude_json}: onboarding is not marked complete")
    projects = data.get("projects")
    projects = projects if isinstance(projects, dict) else {}
    trusted = ctx.trusted_dirs if ctx.trusted_dirs is not None else [ctx.settings.workspace]
    untrusted = [d for d in trusted
                 if not (isinstance(projects.get(d), dict)
                         and projects[d].get("hasTrustDialogAccepted") is True)]
    if untrusted:
        raise StepError(f"{claude_json}: not trusted: {', '.join(untrusted)}")
    return "settings present"


async def check_repository(ctx: BootContext) -> str:
    if not os.environ.get("REPO_URL", "").strip():
        return "no repository requested"
    repo = Path(ctx.settings.workspace, "repo")
    if not (repo / ".git").is_dir():
        raise StepError(f"REPO_URL is set but {repo} holds no repository",
                        "see the repository step's reason")
    return f"{repo} present"


async def check_services(ctx: BootContext) -> str:
    if ctx.services is None:
        raise StepError("no service manager attached to the boot")
    bad = ctx.services.not_running()
    if bad:
        raise StepError(f"not RUNNING: {', '.join(bad)}",
                        "see `codetainer status` for each service's state and last output")
    return "services RUNNING"


BUILTIN_CHECKS = (
    Check("settings", Policy.FATAL, check_settings),
    Check("services", Policy.DEGRADED, check_services),
    Check("repository", Policy.DEGRADED, check_repository),
)


async def _one(check: Check, ctx: BootContext) -> str | None:
    """None when the check passed; else the line that explains the failure."""
    try:
        await asyncio.wait_for(check.fn(ctx), check.timeout)
    except StepError as exc:
        return f"{check.name}: {exc.reason}" + (f" ({exc.hint})" if exc.hint else "")
    except TimeoutError:
        return f"{check.name}: no answer within {check.timeout:g}s"
    except Exception as exc:
        return f"{check.name}: internal error: {type(exc).__name__}: {exc}"
    return None


def _runner(checks: Sequence[Check]) -> Callable[[BootContext], Awaitable[str]]:
    async def run(ctx: BootContext) -> str:
        results = await asyncio.gather(*(_one(c, ctx) for c in checks))
        failures = [r for r in results if r is not None]
        if failures:
            raise StepError("; ".join(failures))
        return f"{len(checks)} checks passed: {', '.join(c.name for c in checks)}"

    return run


def readiness_steps(extra_checks: Sequence[Check] = (),
                    builtin: Sequence[Check] = BUILTIN_CHECKS) -> list[Step]:
    """[``readiness`` (fatal checks), ``readiness-degraded`` (the others)]; a policy with
    no checks yields no step."""
    checks = [*builtin, *extra_checks]
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate readiness check names in {names}")
    steps: list[Step] = []
    for policy, name in ((Policy.FATAL, "readiness"), (Policy.DEGRADED, "readiness-degraded")):
        group = [c for c in checks if c.policy is policy]
        if group:
            steps.append(Step(
                name, _runner(group), timeout=max(c.timeout for c in group) + 1.0,
                policy=policy, description=f"{policy.value} checks: {', '.join(c.name for c in group)}",
            ))
    return steps
