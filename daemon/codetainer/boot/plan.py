"""The boot plan: which steps run, in which order. ``--steps`` selects by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from codetainer.boot.engine import BootContext, Policy, Step, StepError

if TYPE_CHECKING:
    from codetainer.limits.controller import LimitsController
    from codetainer.network.controller import NetworkController
    from codetainer.proxy.setup import ProxyController
    from codetainer.settings import Settings

SERVICES_START_TIMEOUT = 30.0


async def _start_services(ctx: BootContext) -> str:
    services = ctx.services
    if services is None:
        raise StepError("no service manager attached to the boot")
    started = services.start_autostart(exclude=set(ctx.started_by_steps))
    if not started:
        return "no autostart services"
    # RUNNING needs startsecs; wait for the slowest one, bounded.
    longest = max(services.get(n).config.startsecs for n in started)
    timeout = min(SERVICES_START_TIMEOUT, longest + 5.0)
    bad = await services.wait_running(started, timeout)
    if bad:
        detail = "; ".join(
            f"{n} {services.get(n).state.name}"
            + (f" ({services.get(n).fsm.spawnerr})" if services.get(n).fsm.spawnerr else "")
            for n in bad
        )
        raise StepError(f"not running: {detail}",
                        "see `codetainer status` for the service's last output")
    return f"{len(started)} running: {', '.join(started)}"


def services_step() -> Step:
    return Step("services", _start_services, timeout=SERVICES_START_TIMEOUT + 5,
                policy=Policy.DEGRADED, description="start supervised services")


def all_steps(settings: Settings, network: NetworkController,
              limits: LimitsController | None = None,
              proxy: ProxyController | None = None) -> list[Step]:
    """Every boot step, in order (README lists them with their policies)."""
    from codetainer.boot import (
        agent_settings,
        credentials,
        filesystem,
        readiness,
        repository,
        rootfs,
        secrets,
    )
    from codetainer.session.plugins import plugins_step

    return [
        secrets.secrets_step(),
        *([limits.step()] if limits is not None else []),
        filesystem.filesystem_step(),
        *network.steps(),
        *(proxy.steps() if proxy is not None else []),
        credentials.credentials_step(),
        agent_settings.agent_settings_step(),
        rootfs.rootfs_step(),
        services_step(),
        repository.repository_step(settings),
        plugins_step(limits=limits.exec_limits if limits is not None else None),
        *readiness.readiness_steps(network.readiness_checks()),
    ]


#: names accepted by --steps that are not boot steps but post-boot phases
PHASES = ("session",)


def select(steps: list[Step], names: list[str] | None) -> list[Step]:
    if not names:
        return steps
    known = [s.name for s in steps]
    unknown = [n for n in names if n not in known and n not in PHASES]
    if unknown:
        raise ValueError(
            f"unknown boot step(s) {', '.join(unknown)}; known: {', '.join(known + list(PHASES))}")
    return [s for s in steps if s.name in names]
