"""Closing the server side of an asyncio stream connection, for every server we run.

Python 3.11's ``_SelectorSocketTransport`` caches a bound method of itself
(``_read_ready_cb``), so a closed connection is not freed by reference counting but left
to the cyclic garbage collector; with a crowd of short connections (``status`` clients)
the dead transports pile up until a full collection stalls the loop for tens of
milliseconds. CPython fixed it in 3.12 (gh-100348) by dropping the attribute in
``close()``; bookworm ships 3.11, so ``close_writer`` does the same once the transport is
closing (its reader is removed by then: no callback can use it any more).
"""

from __future__ import annotations

import asyncio
import contextlib


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    """Close, wait at most ``timeout`` for the close to finish, free the transport."""
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):  # not wait_for: no extra task per client
            await writer.wait_closed()
    transport = writer.transport
    if transport.is_closing() and getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]
