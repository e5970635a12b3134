"""What the benchmarks share: one percentile.

Each ``bench/bench_*.py`` runs as a script, so this directory is first on ``sys.path``
and ``from _common import pct`` finds this module.
"""

from __future__ import annotations

from collections.abc import Iterable


def pct(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (0 to 100) of ``values``: the sample at rank
    ``round(p / 100 * (n - 1))`` of the sorted values, so always a measured value (no
    interpolation); ``pct(v, 50)`` is the median of an odd count. Raises ValueError on
    no samples."""
    v = sorted(values)
    if not v:
        raise ValueError(f"no samples to take the {p:g}th percentile of")
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]
