"""In-process event bus: boot steps, service transitions and the like.

Every event is a flat JSON-able dict with ``event`` (a stable name), ``ts`` (wall clock)
and ``seq`` (monotonic counter). Subscribers get a bounded queue; a subscriber that
falls behind is cut off (``overflowed``) rather than slowing the daemon down.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

Event = dict[str, Any]


class Subscription:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self.overflowed = False

    def push(self, event: Event) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            # Make room for the end marker so the reader wakes up and leaves.
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    def close(self) -> None:
        self._bus.unsubscribe(self)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event is None:
                return
            yield event


class EventBus:
    def __init__(self, history: int = 500) -> None:
        self._subs: set[Subscription] = set()
        self._seq = itertools.count(1)
        self.history: deque[Event] = deque(maxlen=history)

    def publish(self, name: str, /, **fields: Any) -> Event:
        event: Event = {"event": name, "ts": round(time.time(), 3), "seq": next(self._seq)}
        event.update(fields)
        self.history.append(event)
        for sub in list(self._subs):
            sub.push(event)
        return event

    def subscribe(self, maxsize: int = 1000, replay: bool = False) -> Subscription:
        sub = Subscription(self, maxsize)
        if replay:
            for event in list(self.history)[-maxsize // 2 :]:
                sub.push(event)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def close(self) -> None:
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(None)
            except asyncio.QueueFull:
                sub.overflowed = True
        self._subs.clear()

    @property
    def subscribers(self) -> int:
        return len(self._subs)
