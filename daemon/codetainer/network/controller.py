"""Network isolation as the daemon sees it: boot steps, refresh, status, why/allow.

STUB: the interface the daemon wires; the implementation is being written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codetainer.boot.engine import Step

if TYPE_CHECKING:
    from codetainer.control.server import ControlServer
    from codetainer.events import EventBus
    from codetainer.services.manager import ServiceManager
    from codetainer.settings import Settings


class NetworkController:
    def __init__(self, settings: Settings, events: EventBus, services: ServiceManager) -> None:
        self.settings = settings
        self.events = events
        self.services = services

    def steps(self) -> list[Step]:
        """Boot steps, in order (all fatal): network-config, dns, firewall, network-selftest."""
        return []

    def readiness_checks(self) -> list[Any]:
        """readiness.Check objects: DNS answers, firewall rules present + self-test passed."""
        return []

    def register(self, control: ControlServer) -> None:
        """Register control ops: ``why`` (open to all), ``allow`` (root only)."""

    def status(self) -> dict[str, Any]:
        """The ``network`` section of status; includes ``text`` for the human renderer."""
        return {}

    async def reload(self) -> dict[str, Any]:
        """Re-read the allowlist and apply it without dropping established connections."""
        return {}

    async def close(self) -> None:
        """Stop background tasks. The firewall stays in place (fail closed)."""
