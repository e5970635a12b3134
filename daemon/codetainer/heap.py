"""The daemon's heap after boot: frozen out of the collector's sight, full collections timed.

What is alive when the boot ends (modules, configuration, services, the session) lives as
long as the daemon; left in the oldest generation, every full collection walks all of it
(~34,000 objects), one stall of tens of milliseconds every few seconds under a crowd of
``status`` clients. ``settle_heap`` collects the boot's garbage, then freezes the rest:
later full collections walk only what came after. The cost is bounded: a frozen object
that later becomes cyclic garbage stays, and no more than the boot's heap is ever frozen.

``HeapStats`` keeps the frozen count (read once: ``gc.get_freeze_count()`` walks the
whole frozen list, ~1 ms) and times every full (generation 2) collection from then on,
for the ``daemon`` section of ``status`` and the daemon benchmark, which prints them.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codetainer.status import HeapStatus


class HeapStats:
    def __init__(self) -> None:
        self.frozen = 0
        self.count = 0
        self.longest_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.count += 1
        self.longest_s = max(self.longest_s, time.perf_counter() - self._started)

    def status(self) -> HeapStatus:
        return {"frozen_objects": self.frozen, "full_collections": self.count,
                "longest_full_collection_ms": round(self.longest_s * 1000, 3)}


HEAP = HeapStats()

#: the youngest generation's threshold from codetainerd's start to ``settle_heap``: the
#: imports leave ~32,000 objects that live as long as the daemon, which the default
#: (700) walks in ~90 young and ~10 middle collections (~20 ms of the boot, measured);
#: bounded rather than off, so a boot stuck in a step still collects its cycles
BOOT_GEN0_THRESHOLD = 100_000
_thresholds: tuple[int, int, int] | None = None


def defer_collections() -> None:
    """Hold the collector back until :func:`settle_heap` (codetainerd's entrypoint,
    before its imports): what it would walk now is almost all alive for good, and
    ``settle_heap`` collects the boot's garbage in one pass anyway."""
    global _thresholds
    if _thresholds is None:
        _thresholds = gc.get_threshold()
        gc.set_threshold(BOOT_GEN0_THRESHOLD, *_thresholds[1:])


def settle_heap() -> None:
    global _thresholds
    if _thresholds is not None:  # defer_collections() held the collector back: no more
        gc.set_threshold(*_thresholds)
        _thresholds = None
    gc.collect()
    gc.freeze()
    HEAP.frozen = gc.get_freeze_count()
    if HEAP not in gc.callbacks:
        gc.callbacks.append(HEAP)
