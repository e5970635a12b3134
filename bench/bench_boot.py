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
import compileall
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from codetainer.sandbox.fullboot import FullBoot, default_names, publish_names
from codetainer.sandbox.world import World


@dataclass
class Boots:
    """What ``n`` full boots measured: exec to READY over the socket, the daemon's own boot
    duration, each step's, and init + daemon RSS at READY (from ``codetainer status``)."""

    walls: list[float] = field(default_factory=list)
    boots: list[float] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rss: list[float] = field(default_factory=list)


def compile_tree(env: dict[str, str]) -> None:
    """Byte-compile the tree booted (``env``'s PYTHONPATH, else this checkout), as the
    image's ``pip install`` does. A checkout's modules edited since their last import have
    no current .pyc (PYTHONDONTWRITEBYTECODE=1, and the scratch root's project is
    read-only), so every boot would compile them again (~1.5 ms a module), which the
    image never does."""
    for tree in env.get("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "daemon")
                        ).split(os.pathsep):
        if tree and (Path(tree) / "codetainer").is_dir():
            compileall.compile_dir(Path(tree) / "codetainer", quiet=1)


def timed_boots(world: World, n: int, env: dict[str, str], services: str | None = None,
                binds: tuple[tuple[str, str, bool], ...] = ()) -> Boots:
    """Boot the whole codetainer ``n`` times in ``world`` (a fresh scratch root each)."""
    compile_tree(env)
    out = Boots()
    for _ in range(n):
        with tempfile.TemporaryDirectory(prefix="ct-bench-") as tmp:
            Path(tmp).chmod(0o755)
            fb = FullBoot(world, Path(tmp), services=services, binds=binds,
                          env={"CODETAINER_AGENT_COMMAND": "sleep 1000", **env})
            try:
                t0 = time.monotonic()  # PID 1 has exec'd codetainerd (spawn returned)
                fb.wait_finished(60)  # polled as the HEALTHCHECK does: cheap for the daemon
                out.walls.append(time.monotonic() - t0)
                st = fb.status()
                if st["state"] != "READY":
                    raise SystemExit(f"boot ended {st['state']}: {st['reasons']}")
                info = st["daemon"]
                out.boots.append(float(info["boot_s"]))
                out.rss.append(float(info.get("rss_bytes", 0)) + float(info.get("init_rss_bytes", 0)))
                for s in st["steps"]:
                    out.steps[s["name"]].append(float(s["duration_s"] or 0.0))
                fb.stop()
            finally:
                fb.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--dns-engine", choices=("coredns", "dnsmasq"), default="coredns")
    args = ap.parse_args()
    with World(ttl=60) as world:
        publish_names(world, default_names())
        b = timed_boots(world, args.n, {"CODETAINER_DNS_ENGINE": args.dns_engine})
    walls, boots, steps = b.walls, b.boots, b.steps
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
