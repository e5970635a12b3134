"""What both firewall backends share: the interface they implement, what they report,
and the runner of their tools. Below :mod:`.firewall` (which picks a backend) and the
backends themselves, so neither imports the other's module back.
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from codetainer import runner as process_runner
from codetainer.network.firewall_policy import FirewallPolicy
from codetainer.network.model import IPAddress, IPNetwork

log = structlog.get_logger("codetainer.network")

BACKENDS = ("nftables", "iptables")


class FirewallError(Exception):
    """A firewall operation failed; the message says what failed and what to do next."""


# -- what backends report ------------------------------------------------------------------


@dataclass(frozen=True)
class Denied:
    """One denied destination as the kernel recorded it."""

    addr: str
    proto: str
    port: int
    packets: int
    #: seconds until the record expires; ``seen_ago = denied_timeout - expires_in``
    expires_in: float
    seen_ago: float = 0.0
    #: iptables cannot refresh an element's timeout without resetting its counters, so
    #: there ``seen_ago`` is the first packet's, not the last one's
    first_seen: bool = False

    @property
    def seen(self) -> str:
        return "first" if self.first_seen else "last"


@dataclass(frozen=True)
class FirewallStatus:
    backend: str
    active: bool
    #: element count per set
    sets: dict[str, int] = field(default_factory=dict)
    detail: str = ""


# -- running the tools ---------------------------------------------------------------------


class Runner:
    """Runs firewall tools; ``wrap`` prefixes every command (tests: ``ip netns exec NS``)."""

    def __init__(self, wrap: Sequence[str] = (), timeout: float = 20.0) -> None:
        self.wrap = tuple(wrap)
        self.timeout = timeout

    async def run(
        self, argv: Sequence[str], stdin: str | None = None, *, check: bool = True, what: str = ""
    ) -> tuple[int, str, str]:
        cmd = [*self.wrap, *argv]
        try:
            done = await process_runner.run(cmd, timeout=self.timeout,
                                            input=stdin.encode() if stdin is not None else None)
        except process_runner.SpawnError as exc:
            if exc.errno == errno.ENOENT:
                raise FirewallError(
                    f"{cmd[0]} is not installed: install it, or choose the other backend with "
                    "CODETAINER_FIREWALL=nftables|iptables"
                ) from None
            raise FirewallError(f"{exc} ({what or argv[0]}): check the tool's permissions") from None
        if done.timed_out:
            raise FirewallError(
                f"{argv[0]} did not finish within {self.timeout:.0f}s ({what or argv[0]}): "
                "the kernel or the tool is stuck; check `dmesg` and retry"
            )
        rc, stdout, stderr = done.code, done.stdout, done.stderr
        if check and rc != 0:
            raise FirewallError(
                f"{' '.join(argv[:3])} failed ({what or 'firewall command'}), exit {rc}: "
                f"{stderr.strip()[:2000] or '(no message)'}; check that the kernel supports it "
                "(CODETAINER_FIREWALL=iptables selects the fallback backend)"
            )
        return rc, stdout, stderr


class FirewallBackend(abc.ABC):
    """The interface both backends implement; every method is safe to call repeatedly."""

    name: str = ""

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or Runner()
        self.applied: FirewallPolicy | None = None
        #: applies ``(script, what)`` that only changes set elements: the DNS hook's
        #: persistent set helper once it serves (no ``nft`` process per refresh; ~16 ms
        #: less for the boot's first fill), else None and the backend's one-shot tool
        self.set_scripts: Callable[[str, str], Awaitable[None]] | None = None

    @abc.abstractmethod
    async def apply(self, policy: FirewallPolicy, *, fresh: bool = False) -> None:
        """Install or replace the whole policy in one atomic step; keeps established flows.

        The DNS-filled (dynamic) sets keep their elements (a reload must not forget what
        the DNS server handed out), unless ``fresh``: a boot starts them empty, since a
        table left by an earlier daemon may hold names that are no longer allowed."""

    @abc.abstractmethod
    async def _replace_static(self, policy: FirewallPolicy) -> None:
        """Replace the static sets' contents atomically."""

    async def update_sets(self, policy: FirewallPolicy) -> None:
        """Refresh: swap the static sets' contents; a full :meth:`apply` if the shape changed."""
        if self.applied is None or self.applied.shape() != policy.shape():
            log.info("firewall_reapply", backend=self.name, reason="policy shape changed")
            await self.apply(policy)
            return
        await self._replace_static(policy)
        self.applied = policy

    @abc.abstractmethod
    async def read_denied(self) -> list[Denied]:
        """Denied destinations, most packets first."""

    @abc.abstractmethod
    async def status(self) -> FirewallStatus: ...

    @abc.abstractmethod
    async def contains(self, addr: str) -> list[str]:
        """Names of our sets (model names like ``s4_80_443``) that contain ``addr``."""

    @abc.abstractmethod
    async def teardown(self) -> None:
        """Remove everything this backend installed (nothing else)."""


def member_of(addr: IPAddress, elements: Iterable[IPNetwork]) -> bool:
    return any(addr.version == n.version and addr in n for n in elements)
