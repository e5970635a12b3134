"""What a piece of work leaves to the cyclic garbage collector."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable


async def transports_left_by(clients: Callable[[], None]) -> list[object]:
    """Run blocking ``clients`` in a thread; return the asyncio transports that became
    cyclic garbage meanwhile (instead of being freed by reference counting)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await asyncio.to_thread(clients)
        await asyncio.sleep(0.2)  # every server-side connection closed
        gc.collect()
        return [o for o in gc.garbage if "Transport" in type(o).__name__]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
