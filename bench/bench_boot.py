"""Boot-to-READY wall time of the whole codetainer, against the test world.

Run as root: ``/opt/ctvenv/bin/python bench/bench_boot.py [-n 10]``. Each run starts
codetainerd as PID 1 in a fresh scratch root joined to the test world (shipped default
allowlist, every name answered by the world's DNS, no clone; CoreDNS as in the image,
``--dns-engine dnsmasq`` for the other engine), waits for READY, and stops it. Prints
the median of the runs, both from the moment the scratch root's PID 1 exec'd
codetainerd to READY observed over the socket, and the daemon's own boot duration, plus
the median per-step breakdown from ``codetainer status``. The reference entrypoint
spends over a second in fixed sleeps alone (issue 10's target: exec to READY <= 300 ms;
``bench/bench_fastpaths.py --baseline TREE`` measures it beside another checkout).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from codetainer.sandbox.fullboot import FullBoot, default_names, publish_names
from codetainer.sandbox.world import World


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--dns-engine", choices=("coredns", "dnsmasq"), default="coredns")
    args = ap.parse_args()
    walls: list[float] = []
    boots: list[float] = []
    steps: dict[str, list[float]] = defaultdict(list)
    with World(ttl=60) as world:
        publish_names(world, default_names())
        for _ in range(args.n):
            with tempfile.TemporaryDirectory(prefix="ct-bench-") as tmp:
                Path(tmp).chmod(0o755)
                fb = FullBoot(world, Path(tmp), env={"CODETAINER_AGENT_COMMAND": "sleep 1000",
                                                     "CODETAINER_DNS_ENGINE": args.dns_engine})
                try:
                    t0 = time.monotonic()  # PID 1 has exec'd codetainerd (spawn returned)
                    st = fb.wait_boot(60)
                    walls.append(time.monotonic() - t0)
                    if st["state"] != "READY":
                        raise SystemExit(f"boot ended {st['state']}: {st['reasons']}")
                    boots.append(float(st["daemon"]["boot_s"]))
                    for s in st["steps"]:
                        steps[s["name"]].append(float(s["duration_s"] or 0.0))
                    fb.stop()
                finally:
                    fb.close()
    print(f"boot to READY ({args.dns_engine}), n={args.n}: "
          f"median {statistics.median(walls) * 1000:.0f} ms from exec "
          f"(min {min(walls) * 1000:.0f}, max {max(walls) * 1000:.0f}); the daemon's own boot "
          f"median {statistics.median(boots) * 1000:.0f} ms (target exec to READY <= 300 ms, "
          "issue 10; beside a baseline: bench/bench_fastpaths.py)")
    print("median per step:")
    for name, vals in steps.items():
        print(f"  {name:<20} {statistics.median(vals) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
