"""The DNS server's start, for the ``dns`` step and the guard's restarts: the supervised
``dns`` service started and waited on until it answers, and what the step imports,
prepared while ``network-config`` waits on nft.

A server that answers real queries is up, whatever ``startsecs`` says: the boot goes on
then (the supervisor still moves it to RUNNING at ``startsecs`` and restarts it if it
dies later). Until it answers, a process that exits is the supervisor's to retry
(BACKOFF); the start fails only at FATAL or the deadline. The supervisor's verdicts are
waited on (``Service.wait_state`` is signalled by the state change); only the "does it
answer" probe is repeated while STARTING: when the server writes a line (CoreDNS lists
its zones once it listens), at the latest every ``DNS_PROBE_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from typing import TYPE_CHECKING

from codetainer.boot.engine import StepError
from codetainer.network import dnscheck
from codetainer.services.states import ProcessState

if TYPE_CHECKING:
    from codetainer.services.process import Service

DNS_START_TIMEOUT = 20.0
#: between two "does it answer" probes of a STARTING DNS server that says nothing
DNS_PROBE_INTERVAL = 0.02
#: what the dns step imports (dnspython: ~40 ms): the hook's module or, without the
#: hook, what dnscheck's queries use
HOOK_MODULE = "codetainer.network.dnshook"
QUERY_MODULE = "dns.message"


def import_beside(name: str) -> asyncio.Future[object] | None:
    """Import module ``name`` in a worker thread, while the loop waits on something else
    (None: imported already). Await the future before your own ``import``, which raises
    what the import in the thread raised."""
    if name in sys.modules:
        return None
    fut: asyncio.Future[object] = asyncio.ensure_future(
        asyncio.to_thread(importlib.import_module, name))
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
    return fut


class ServerStart:
    """Starts the DNS server's service and returns once it serves; :meth:`heard` is the
    service's output listener (each line wakes a waiting probe)."""

    def __init__(self) -> None:
        self._spoke = asyncio.Event()

    def heard(self) -> None:
        self._spoke.set()

    async def start(self, svc: Service, probe: str, listen: str) -> None:
        """``svc`` started (by the caller) serves: ``probe`` (a name) gets an answer from
        ``listen``:53. StepError when it settles FATAL or the deadline passes."""
        deadline = time.monotonic() + svc.config.startsecs + DNS_START_TIMEOUT
        settled = {ProcessState.RUNNING, ProcessState.FATAL}
        while (left := deadline - time.monotonic()) > 0:
            state = svc.state
            if state is ProcessState.RUNNING:
                return
            if state is ProcessState.FATAL:
                break
            if state is ProcessState.STARTING:
                self._spoke.clear()
                answer = await dnscheck.query(probe, "A", listen, 53, timeout=0.1)
                if answer.rcode not in ("TIMEOUT", "ERROR"):  # it answered: it serves
                    return
                # the next probe when the server speaks or the interval ends, or at once
                # when the supervisor settles it
                await self._settled_or_spoke(svc, settled, min(DNS_PROBE_INTERVAL, left))
            else:  # BACKOFF between tries: nothing answers until it is STARTING again
                await svc.wait_state(settled | {ProcessState.STARTING}, left)
        if svc.state is ProcessState.RUNNING:  # settled as the deadline came
            return
        tail = " | ".join(list(svc.tail)[-3:])
        err = f" ({svc.fsm.spawnerr})" if svc.fsm.spawnerr else ""
        raise StepError(f"the DNS server did not start: {svc.state.name}{err}"
                        + (f"; output: {tail}" if tail else ""),
                        "see the dns service in `codetainer status`")

    async def _settled_or_spoke(self, svc: Service, states: set[ProcessState],
                                timeout: float) -> None:
        """Until ``svc`` enters one of ``states``, the server writes a line, or
        ``timeout`` passes."""
        if self._spoke.is_set():
            return
        waits = {asyncio.ensure_future(svc.wait_state(states, timeout)),
                 asyncio.ensure_future(self._spoke.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
