#!/usr/bin/env python3
"""What the seccomp loader adds to every agent process start (boot/seccomp.py).

The agent's exec chain (boot/privileges.setpriv_argv) without the loader step, with the
C loader (``codetainer-seccomp HEX --``, what the chain runs where ./dev setup or the
image built it) and with the Python loader it stands for (``python3 -I -S -c LOADER HEX
--``), run side by side, N times each, as a spare uid with ``/bin/true`` as the program.
Run as root:

    /opt/ctvenv/bin/python bench/bench_seccomp.py [-n 41]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from _common import pct
from codetainer.boot import chain as chainmod
from codetainer.boot import seccomp
from codetainer.boot.privileges import AgentUser, setpriv_argv

SPARE = AgentUser("spare", 64125, 64125, "/")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=41)
    args = p.parse_args()
    chain = setpriv_argv(SPARE, ["/bin/true"])
    at = chain.index("--", next(i for i, a in enumerate(chain) if a.endswith("setpriv"))) + 1
    end = chain.index("--", at) + 1
    without = chain[:at] + chain[end:]
    c_loader = chainmod.loader_argv(seccomp.filter_hex(), chain[at + 2:end - 1])
    py_loader = chainmod.loader_argv(seccomp.filter_hex(), chain[at + 2:end - 1], native=False)
    if without[at:] != ["/bin/true"] or chain[at:end] != c_loader or "-S" not in py_loader:
        raise SystemExit(f"unexpected chain shape (is codetainer-seccomp built?): {chain}")
    rows = {"without": without, "with C": chain, "with Python": [*chain[:at], *py_loader,
                                                                 *chain[end:]]}
    for argv in rows.values():
        subprocess.run(argv, check=True)  # warm the page cache
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.n):  # interleaved: the machine's noise hits them alike
        for name, argv in rows.items():
            t0 = time.perf_counter()
            subprocess.run(argv, check=True)
            times[name].append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    clear = getattr(seccomp.compile_filter, "cache_clear", None)
    if clear is not None:
        clear()
    seccomp.compile_filter()
    compile_ms = (time.perf_counter() - t0) * 1000
    for name in rows:
        v = sorted(times[name])
        print(f"agent exec chain {name:<12} the loader: median {statistics.median(v):6.1f} ms  "
              f"p90 {pct(v, 90):6.1f} ms  (n={len(v)})")
    base = statistics.median(times["without"])
    c, py = (statistics.median(times[k]) - base for k in ("with C", "with Python"))
    print(f"per agent process start the C loader adds {c:+.1f} ms, the Python one {py:+.1f} ms; "
          f"compiling the filter (once per daemon) {compile_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
