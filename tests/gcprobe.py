"""What a piece of work leaves to the cyclic garbage collector."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable


async def connections_closed(handler: str, timeout: float = 5.0) -> None:
    """Wait until no task of the running loop runs the server's connection handler
    ``handler`` (its qualified name, ``"ControlServer._on_client"``): the server side has
    finished every connection, its closing included."""
    deadline = time.monotonic() + timeout
    while any(getattr(t.get_coro(), "__qualname__", None) == handler
              for t in asyncio.all_tasks()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{handler} still serving a connection after {timeout:g}s")
        await asyncio.sleep(0.01)


async def transports_left_by(clients: Callable[[], None], handler: str) -> list[object]:
    """Run blocking ``clients`` in a thread; return the asyncio transports that became
    cyclic garbage meanwhile (instead of being freed by reference counting). ``handler``:
    the server's connection handler, as for :func:`connections_closed`."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await asyncio.to_thread(clients)
        await connections_closed(handler)
        gc.collect()
        return [o for o in gc.garbage if "Transport" in type(o).__name__]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
