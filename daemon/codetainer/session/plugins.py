"""Boot step ``plugins``: install the configured Claude Code plugins before the session.

``CODETAINER_PLUGINS`` is a comma-separated list of two kinds of entries, in any order:

* a marketplace source: anything with a ``/`` or ``:`` in it (``anthropics/claude-code``,
  ``https://example.com/marketplace.json``, ``git@host:org/repo.git``, or a local
  directory ``/opt/marketplace``), added with
  ``claude plugin marketplace add SOURCE``;
* a plugin: ``name@marketplace`` (or a bare ``name``), installed with
  ``claude plugin install ENTRY`` after every marketplace was added.

Every command runs as the agent user (setpriv, agent environment, the agent's limits)
with its own timeout.
The step's policy is ``degraded``: a failing command is a warning with its reason, the
others still run, and the agent starts anyway. A malformed entry never gets this far: the
settings parse the list at start (codetainerd exits 64 naming the entry).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import structlog

from codetainer import runner
from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.privileges import AgentProxy, AgentUser, ExecLimits, agent_env, setpriv_argv
from codetainer.limits.plan import settings_exec_limits
from codetainer.settings import PluginPlan, SettingsError, plugin_plan

log = structlog.get_logger("codetainer.session")


def parse_plugins(spec: str) -> PluginPlan:
    """Split a ``CODETAINER_PLUGINS`` text as the settings do (they hold the parsed plan);
    :class:`SettingsError` (a ValueError) names the variable and the bad entry."""
    try:
        return plugin_plan(spec)
    except ValueError as exc:
        raise SettingsError("plugins", spec, str(exc)) from None


def _redact(text: str, secrets: Mapping[str, str]) -> str:
    for value in secrets.values():
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


async def _run_one(argv: list[str], env: dict[str, str], cwd: str,
                   timeout: float) -> tuple[bool, str]:
    """(ok, reason). 'already added/installed' counts as success: boot is idempotent.
    At the timeout the command's whole process group is killed (what it forked too)."""
    try:
        done = await runner.run(argv, timeout=timeout, env=env, cwd=cwd, merge_stderr=True)
    except runner.SpawnError as exc:
        return False, str(exc)
    if done.timed_out:
        return False, done.outcome
    text = done.stdout
    if done.code == 0:
        return True, _last_line(text)
    if "already" in text.lower():
        return True, _last_line(text)
    return False, _last_line(text) or f"exit status {done.code}"


def plugins_step(
    user: AgentUser | None = None,
    *,
    claude: str = "claude",
    timeout: float = 600.0,
    command_timeout: float = 180.0,
    requires: tuple[str, ...] = (),
    limits: Callable[[], ExecLimits] | None = None,
) -> Step:
    """The ``plugins`` boot step (policy degraded). ``user`` defaults to the settings';
    ``limits`` (what the commands start under) to the settings' per-process limits."""

    async def run(ctx: BootContext) -> str | None:
        plan = ctx.settings.plugins  # parsed and checked with the settings
        if not plan.marketplaces and not plan.plugins:
            return "no plugins configured"
        agent = user
        if agent is None:
            try:
                agent = AgentUser.lookup(ctx.settings.agent_user, ctx.settings.home)
            except LookupError as exc:
                raise StepError(str(exc)) from None
        env = agent_env(agent, ctx.secrets, os.environ, proxy=AgentProxy.of(ctx.settings))
        under = limits() if limits is not None else settings_exec_limits(ctx.settings)
        cwd = agent.home if os.path.isdir(agent.home) else "/"
        failures: list[str] = []
        for args in plan.commands():
            what = " ".join(args[1:])
            ok, reason = await _run_one(setpriv_argv(agent, [claude, *args], under), env,
                                        cwd, command_timeout)
            reason = _redact(reason, ctx.secrets)
            if ok:
                log.info("plugin_ok", command=what)
            else:
                log.warning("plugin_failed", command=what, reason=reason)
                failures.append(f"{what}: {reason}")
        total = len(plan.commands())
        if failures:
            raise StepError(
                f"{len(failures)} of {total} plugin commands failed: " + "; ".join(failures),
                "check CODETAINER_PLUGINS and that the marketplaces are on the allowlist",
            )
        return (f"{len(plan.plugins)} plugin(s) installed from "
                f"{len(plan.marketplaces)} marketplace(s)")

    return Step(name="plugins", run=run, timeout=timeout, policy=Policy.DEGRADED,
                requires=requires, description="install Claude Code plugins")
