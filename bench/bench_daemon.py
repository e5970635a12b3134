"""Foundation benchmarks: idle footprint, `codetainer status` wall time, status latency.

Run as root: ``/opt/ctvenv/bin/python bench/bench_daemon.py [--idle 60]``. Boots the real
codetainerd as PID 1 in fresh namespaces with the repository's services file, then prints:

* idle RSS (init + daemon) and CPU over the idle window;
* ``codetainer status`` end-to-end wall time (process start to exit), median of 30;
* ``status`` request latency p50/p99 with 200 concurrent clients, each polling every
  100 ms over a fresh connection (as the CLI does), from 4 load processes; then the
  saturation point (the same 200 clients back to back), and the daemon's heap figures
  from ``status`` (objects frozen after boot, full collections and the longest);
* the daemon's CPU per ``status`` request: 3,000 sequential requests, a fresh connection
  each, one client (what the crowd above costs the daemon, without the crowd).

``--baseline CHECKOUT`` then runs the 200-client figures ``--rounds`` times against the
daemon of another checkout and this one, alternating, and prints both p99 series.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import pct
from codetainer.control import protocol
from codetainer.sandbox.daemonproc import DaemonProc

ROOT = Path(__file__).resolve().parents[1]


async def one(sock: str) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(protocol.request("status", tail=False))
    await writer.drain()
    await reader.readline()
    writer.close()
    return time.perf_counter() - t0


async def clients(sock: str, n: int, duration: float, period: float) -> list[float]:
    """n clients; each connects, asks status, reads the reply, sleeps ``period`` (0: none)."""
    out: list[float] = []
    stop = time.monotonic() + duration

    async def client(i: int) -> None:
        await asyncio.sleep(period * i / n)  # spread the starts
        while time.monotonic() < stop:
            out.append(await one(sock))
            if period:
                await asyncio.sleep(period)

    await asyncio.gather(*(client(i) for i in range(n)))
    return out


def worker(sock: str, n: int, duration: float, period: float, q: mp.Queue) -> None:
    q.put(asyncio.run(clients(sock, n, duration, period)))


def load(sock: str, total: int, procs: int, duration: float, period: float) -> list[float]:
    """Spread the clients over several processes so the load generator is not the bottleneck."""
    q: mp.Queue = mp.Queue()
    ps = [mp.Process(target=worker, args=(sock, total // procs, duration, period, q))
          for _ in range(procs)]
    for p in ps:
        p.start()
    lat: list[float] = []
    for _ in ps:
        lat += q.get()
    for p in ps:
        p.join()
    return lat


def boot(tmp: Path, src: str | None = None) -> DaemonProc:
    """The real daemon, READY; ``src``: another checkout whose daemon/ goes first on its
    PYTHONPATH (the baseline of a side-by-side run)."""
    conf = (ROOT / "supervisord" / "codetainer.conf").read_text()
    conf += "\n[program:idle]\ncommand=/bin/sleep 100000\nstartsecs=0\n"
    env = {"CODETAINER_LOG_LEVEL": "info"}
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve() / "daemon")
    d = DaemonProc(Path(tempfile.mkdtemp(prefix="ct-bench-", dir=tmp)), conf, env=env)
    d.wait_socket()
    d.wait_until(lambda: d.status()["state"] == "READY", what="READY")
    return d


def crowd(d: DaemonProc) -> tuple[str, float]:
    """The 200-client figures of one daemon (and what its collector did meanwhile)."""
    lat = load(d.socket, 200, 4, 10.0, 0.1)
    p99 = pct(lat, 99)
    line = (f"status latency, 200 concurrent clients each polling every 100 ms "
            f"({len(lat) / 10:.0f} req/s): p50 {pct(lat, 50) * 1000:.2f} ms, "
            f"p99 {p99 * 1000:.2f} ms (target p99 <= 10 ms)")
    lat = load(d.socket, 200, 4, 5.0, 0.0)
    line += (f"\nsaturation, 200 clients back to back: {len(lat) / 5:.0f} req/s, "
             f"p50 {pct(lat, 50) * 1000:.2f} ms, p99 {pct(lat, 99) * 1000:.2f} ms")
    heap = d.status()["daemon"].get("heap")
    if heap:
        line += (f"\ndaemon heap: {heap['frozen_objects']} objects frozen after boot; "
                 f"{heap['full_collections']} full collections since, the longest "
                 f"{heap['longest_full_collection_ms']:.2f} ms")
    return line, p99


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=float, default=60.0, help="idle window, seconds")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also run the 200-client figures against the daemon of another "
                    "checkout (e.g. `git worktree add /opt/ct-base REV`), alternating")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds with --baseline")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ct-bench-"))
    try:
        d = boot(tmp)
        try:
            init = psutil.Process(d.init_pid)
            daemon = init.children()[0]
            procs = [init, daemon]
            cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
            time.sleep(args.idle)
            cpu1 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
            rss = [p.memory_info().rss for p in procs]
            print(f"idle {args.idle:.0f}s: RSS init {rss[0] / 2**20:.1f} MiB + daemon "
                  f"{rss[1] / 2**20:.1f} MiB = {sum(rss) / 2**20:.1f} MiB; "
                  f"CPU {cpu1 - cpu0:.3f} s ({100 * (cpu1 - cpu0) / args.idle:.3f} %)")

            cli = str(Path(sys.executable).parent / "codetainer")
            walls = []
            for _ in range(30):
                t0 = time.perf_counter()
                subprocess.run([cli, "--socket", d.socket, "status"], capture_output=True, check=False)
                walls.append(time.perf_counter() - t0)
            print(f"`codetainer status` wall time: median {statistics.median(walls) * 1000:.1f} ms, "
                  f"p90 {pct(walls, 90) * 1000:.1f} ms (n=30; target median <= 35 ms, issue 10; "
                  "beside a baseline: bench/bench_fastpaths.py)")

            print(crowd(d)[0])

            from codetainer.control.client import Client

            n = 3000
            c0 = sum(daemon.cpu_times()[:2])
            t0 = time.perf_counter()
            for _ in range(n):
                with Client(d.socket, timeout=5) as c:
                    c.call("status")
            wall, cpu = time.perf_counter() - t0, sum(daemon.cpu_times()[:2]) - c0
            print(f"one status request, {n} in sequence: daemon CPU {cpu / n * 1000:.3f} ms, "
                  f"round trip {wall / n * 1000:.3f} ms")
        finally:
            d.close()
        if args.baseline:
            p99s: dict[str, list[float]] = {"this checkout": [], "baseline": []}
            for r in range(args.rounds):
                for name, src in (("baseline", args.baseline), ("this checkout", None)):
                    d = boot(tmp, src)
                    try:
                        line, p99 = crowd(d)
                    finally:
                        d.close()
                    p99s[name].append(p99)
                    print(f"-- round {r + 1}, {name}\n{line}")
            for name, values in p99s.items():
                ms = ", ".join(f"{v * 1000:.2f}" for v in values)
                print(f"side by side, {name}: p99 {ms} ms; median "
                      f"{statistics.median(values) * 1000:.2f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
