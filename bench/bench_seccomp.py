#!/usr/bin/env python3
"""What the seccomp loader adds to every agent process start (boot/seccomp.py).

The agent's exec chain (boot/privileges.setpriv_argv) with and without the loader step
(``python3 -I -S -c LOADER HEX --``), run side by side, N times each, as a spare uid
with ``/bin/true`` as the program. Run as root:

    /opt/ctvenv/bin/python bench/bench_seccomp.py [-n 41]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from _common import pct
from codetainer.boot import seccomp
from codetainer.boot.privileges import AgentUser, setpriv_argv

SPARE = AgentUser("spare", 64125, 64125, "/")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=41)
    args = p.parse_args()
    chain = setpriv_argv(SPARE, ["/bin/true"])
    at = chain.index(seccomp.LOADER) - 4
    without = chain[:at] + chain[chain.index("--", at) + 1:]
    if without[at:] != ["/bin/true"]:
        raise SystemExit(f"unexpected chain shape: {chain}")
    subprocess.run(chain, check=True)  # warm the page cache
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.n):  # interleaved: the machine's noise hits both alike
        for name, argv in (("without", without), ("with", chain)):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True)
            times[name].append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    clear = getattr(seccomp.compile_filter, "cache_clear", None)
    if clear is not None:
        clear()
    seccomp.compile_filter()
    compile_ms = (time.perf_counter() - t0) * 1000
    for name in ("without", "with"):
        v = sorted(times[name])
        print(f"agent exec chain {name:<7} the filter: median {statistics.median(v):6.1f} ms  "
              f"p90 {pct(v, 90):6.1f} ms  (n={len(v)})")
    added = statistics.median(times["with"]) - statistics.median(times["without"])
    print(f"the loader adds {added:+.1f} ms per agent process start; compiling the filter "
          f"(once per daemon) {compile_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
