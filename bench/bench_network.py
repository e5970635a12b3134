"""Network benchmarks: ours against the reference approach, side by side, in the test world.

Run as root: ``/opt/ctvenv/bin/python bench/bench_network.py [--quick]``. Prints:

1. refresh wall time at 25, 250 and 1,000 names. Ours: the refresh task's tick
   (every name resolved concurrently through the daemon's DNS server, one nft
   transaction swapping the static sets), with each engine: CoreDNS (each answer through
   the daemon's hook, which inserts it into a dynamic set first) and dnsmasq (``nftset=``).
   Reference: ``dig`` per name, sequentially (through the dnsmasq daemon's server), then
   the ruleset rebuilt with one ``iptables -A`` per address. All with a cold DNS cache
   (every lookup goes to the world's upstream).
2. rotation: an allowed name moves to the next of 20 addresses every 2 s; 2,000
   resolve-then-connect attempts over 60 s (``--quick``: 500 over 15 s). Ours with
   CoreDNS (-> the daemon's hook) and with dnsmasq (``nftset=``). Reference: the
   address list resolved once and refreshed every 300 s, no DNS-side insertion.
3. connect latency to the last of 1,000 allowed addresses: one nftables set lookup
   against 1,000 linear iptables rules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import pct
from codetainer.sandbox.netdaemon import AGENT, ENGINES, ROTATION, rotation_run, start_daemon, wait_boot
from codetainer.sandbox.world import ALLOWED_HOSTS, NEVER_HOSTS, UPSTREAM, World

TARGET = ALLOWED_HOSTS[0]
IPT = "iptables-legacy" if subprocess.run(["which", "iptables-legacy"], capture_output=True).returncode == 0 \
    else "iptables"


def bench_addr(i: int) -> str:
    """Addresses in 198.18.0.0/15 (RFC 2544 benchmarking): DNS answers only, never dialled."""
    return f"198.18.{i // 125}.{(i % 125) * 2 + 1}"  # never adjacent: no range merging


def names_for(n: int) -> list[str]:
    return ["target.bench", *(f"n{i}.bench" for i in range(n - 1))]


# -- 1. refresh wall time (runs inside the inner netns) -------------------------------------------


async def inner_refresh(names: list[str], ours_rounds: int, ref_rounds: int,
                        run_dir: str) -> dict[str, Any]:
    from codetainer.network.allowlist import Allowlist, parse_text
    from codetainer.network.compose import build_policy, make_plan, parse_options
    from codetainer.network.dnscheck import resolve_all
    from codetainer.network.dnsconfig import Engine
    from codetainer.network.firewall import Runner
    from codetainer.network.firewall_nft import NftablesBackend
    from codetainer.network.refresh import Contents, Refresher
    from codetainer.settings import Settings

    settings = Settings(dns_user="nobody", upstreams=UPSTREAM, refresh_min_ttl="300",
                        refresh_max_ttl="300", run_dir=run_dir)
    opts = parse_options(settings, Engine.DNSMASQ)
    plan = make_plan(Allowlist(tuple(parse_text("\n".join(names), "bench"))), opts, "nftables")
    backend = NftablesBackend(Runner())
    backend.applied = build_policy(plan, plan.fixed, opts)  # the daemon's shape: a set swap

    async def apply(contents: Contents) -> None:
        await backend.update_sets(build_policy(plan, contents, opts))

    async def resolve(ns: Any) -> Any:
        return await resolve_all(ns, "127.0.0.53", 53, timeout=2.0, concurrency=64)

    refresher = Refresher(plan.names, resolve, apply, min_ttl=300, max_ttl=300, grace=600)
    ours = []
    for _ in range(ours_rounds):
        await asyncio.sleep(1.2)  # the world's TTL is 1 s: the cache is cold again
        t = time.perf_counter()
        report = await refresher.tick(list(plan.names), force=True)
        ours.append(time.perf_counter() - t)
        assert report.ok == len(names) and report.applied, report
    subprocess.run([IPT, "-N", "CT-REF"], capture_output=True)
    ref = []
    for _ in range(ref_rounds):
        await asyncio.sleep(1.2)
        t = time.perf_counter()
        addrs: list[str] = []
        for name in names:
            out = subprocess.run(["dig", "+short", "+time=2", "+tries=1", "@127.0.0.53", name],
                                 capture_output=True, text=True)
            addrs += out.stdout.split()
        subprocess.run([IPT, "-F", "CT-REF"], check=True)
        for a in addrs:
            subprocess.run([IPT, "-A", "CT-REF", "-d", a, "-p", "tcp", "-m", "multiport",
                            "--dports", "80,443", "-j", "ACCEPT"], check=True)
        ref.append(time.perf_counter() - t)
        assert len(addrs) == len(names), len(addrs)
    subprocess.run([IPT, "-F", "CT-REF"], capture_output=True)
    subprocess.run([IPT, "-X", "CT-REF"], capture_output=True)
    return {"ours": ours, "ref": ref}


def refresh_run(names: list[str], engine: str, ref_rounds: int) -> dict[str, Any]:
    """The daemon with ``engine`` up in a fresh world, the refresh measured in its netns."""
    with World(ttl=1) as world:
        world.records.update({name: [bench_addr(i)] for i, name in enumerate(names)})
        world.set_records("target.bench", [TARGET])
        tmp = Path(tempfile.mkdtemp(prefix="ct-bench-net-"))
        tmp.chmod(0o755)  # CoreDNS reads its Corefile as the DNS user
        env = {"CODETAINER_REFRESH_MIN_TTL": "300", "CODETAINER_REFRESH_MAX_TTL": "300",
               "CODETAINER_PROBE_ALLOWED": f"{TARGET}:443"}
        d = start_daemon(world, tmp, "".join(f"{x}\n" for x in names), env=env, engine=engine)
        try:
            st = wait_boot(d, 120)
            assert st["state"] == "READY", st["reasons"]
            argv = [sys.executable, __file__, "--inner-refresh", json.dumps([names, 5, ref_rounds])]
            out = world.run_in(world.inner, argv, timeout=900)
            assert out.returncode == 0, out.stderr[-3000:]
            res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            return res
        finally:
            d.close()
            shutil.rmtree(tmp, ignore_errors=True)


def refresh_bench(sizes: list[int], quick: bool) -> list[tuple[int, float, float, float]]:
    rows = []
    for n in sizes:
        names = names_for(n)
        ref_rounds = 1 if n >= 1000 or quick else 3
        runs = {e: refresh_run(names, e, ref_rounds if e == "dnsmasq" else 0) for e in ENGINES}
        core = statistics.median(runs["coredns"]["ours"])
        masq = statistics.median(runs["dnsmasq"]["ours"])
        ref = statistics.median(runs["dnsmasq"]["ref"])
        rows.append((n, core, masq, ref))
        print(f"  refresh {n:>5} names: ours CoreDNS {core * 1000:8.1f} ms, dnsmasq {masq * 1000:8.1f} ms"
              f"   reference {ref * 1000:9.1f} ms   {ref / core:6.1f}x / {ref / masq:6.1f}x faster",
              flush=True)
    return rows


# -- 2. rotation -----------------------------------------------------------------------------------


def rotation_ours(engine: str, attempts: int, seconds: float) -> dict[str, Any]:
    env = {"CODETAINER_REFRESH_MIN_TTL": "30", "CODETAINER_REFRESH_MAX_TTL": "300"}
    with World(ttl=1) as world:
        world.set_records("rot.test", [ROTATION[0]])
        tmp = Path(tempfile.mkdtemp(prefix="ct-bench-rot-"))
        tmp.chmod(0o755)  # CoreDNS reads its Corefile as the DNS user
        d = start_daemon(world, tmp, "rot.test\n", env=env, engine=engine)
        try:
            assert wait_boot(d)["state"] == "READY"
            return rotation_run(world, attempts, seconds)
        finally:
            d.close()
            shutil.rmtree(tmp, ignore_errors=True)


def rotation_reference(attempts: int, seconds: float) -> dict[str, Any]:
    """The reference: a resolver that does not touch the firewall, and the allowed
    addresses as resolved at start (its next refresh is 300 s away)."""
    from codetainer.network.firewall import FirewallPolicy, Runner, make_backend

    with World(ttl=1) as world:
        world.set_records("rot.test", [ROTATION[0]])
        backend = make_backend("nftables", Runner(["ip", "netns", "exec", world.inner]))
        policy = FirewallPolicy.build({(80, 443): [ROTATION[0]]}, dns_uid=65534, upstreams=[UPSTREAM])
        asyncio.run(backend.apply(policy))
        world.spawn_in(world.inner, [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--listen-address=127.0.0.53", "--bind-interfaces", f"--server={UPSTREAM}",
            "--user=nobody", "--pid-file=", "--log-facility=-",
        ])
        deadline = time.monotonic() + 10
        dig = ["dig", "+short", "+time=1", "@127.0.0.53", "rot.test"]
        while world.run_in(world.inner, dig).stdout.strip() != ROTATION[0]:
            assert time.monotonic() < deadline, "reference dnsmasq did not answer"
            time.sleep(0.1)
        return rotation_run(world, attempts, seconds)


# -- 3. connect latency ------------------------------------------------------------------------------

_CONNECT = r"""
import json, socket, struct, sys, time
host, n = sys.argv[1], int(sys.argv[2])
L0 = struct.pack("ii", 1, 0)
out = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection((host, 443), timeout=2)
    out.append((time.perf_counter() - t) * 1e6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, L0); s.close()
print(json.dumps(out))
"""


def latency_bench(n_conn: int, rounds: int = 4) -> tuple[list[float], list[float], list[float]]:
    """Samples (µs) with no firewall, ours, the reference; the three alternate, ``rounds``
    times, so warm-up and drift hit them alike."""
    from codetainer.network.firewall import FirewallPolicy, Runner, make_backend

    addrs = [bench_addr(i) for i in range(999)] + [TARGET]
    rules = ["*filter", ":CT-REF - [0:0]", "-A OUTPUT -j CT-REF",
             "-A CT-REF -m state --state ESTABLISHED,RELATED -j ACCEPT"]
    rules += [f"-A CT-REF -d {a}/32 -p tcp -m multiport --dports 80,443 -j ACCEPT" for a in addrs]
    rules += ["-A CT-REF -p tcp -j REJECT --reject-with tcp-reset", "COMMIT"]
    policy = FirewallPolicy.build({(80, 443): addrs}, dns_uid=65534, upstreams=[UPSTREAM])
    out: dict[str, list[float]] = {"none": [], "ours": [], "ref": []}
    with World() as world:
        backend = make_backend("nftables", Runner(["ip", "netns", "exec", world.inner]))

        def measure(kind: str) -> None:
            r = world.python_in(world.inner, _CONNECT, TARGET, str(n_conn), uid=AGENT, timeout=300)
            assert r.returncode == 0, r.stderr
            out[kind] += json.loads(r.stdout)

        measure("none")  # warm-up, discarded
        out["none"].clear()
        for _ in range(rounds):
            measure("none")
            asyncio.run(backend.apply(policy))
            assert world.connect(NEVER_HOSTS[0], 443, uid=AGENT)[0] == "ECONNREFUSED"
            measure("ours")
            asyncio.run(backend.teardown())
            r = world.run_in(world.inner, [f"{IPT}-restore", "--noflush"], input="\n".join(rules) + "\n")
            assert r.returncode == 0, r.stderr
            assert world.connect(NEVER_HOSTS[0], 443, uid=AGENT)[0] == "ECONNREFUSED"
            measure("ref")
            for cmd in (["-D", "OUTPUT", "-j", "CT-REF"], ["-F", "CT-REF"], ["-X", "CT-REF"]):
                world.run_in(world.inner, [IPT, *cmd], check=True)
    return out["none"], out["ours"], out["ref"]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="rotation 500 attempts / 15 s")
    ap.add_argument("--sizes", default="25,250,1000")
    ap.add_argument("--skip", default="", help="comma-separated: refresh,rotation,latency")
    ap.add_argument("--inner-refresh", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner_refresh:
        names, ours_rounds, ref_rounds = json.loads(args.inner_refresh)
        with tempfile.TemporaryDirectory(prefix="ct-bench-net-run-") as run_dir:
            print(json.dumps(asyncio.run(inner_refresh(names, ours_rounds, ref_rounds, run_dir))))
        return 0
    if os.geteuid() != 0:
        print("bench_network: run as root (it builds network namespaces)")
        return 2
    skip = set(args.skip.split(","))
    print("== codetainer network benchmark (ours vs the reference approach) ==", flush=True)
    if "refresh" not in skip:
        print("1. refresh wall time (cold DNS cache, median)")
        refresh_bench([int(s) for s in args.sizes.split(",")], args.quick)
    if "rotation" not in skip:
        attempts, seconds = (500, 15.0) if args.quick else (2000, 60.0)
        print(f"2. rotation: 20 addresses, every 2 s; {attempts} resolve-then-connect attempts "
              f"in {seconds:.0f} s")
        runs = (("ours, CoreDNS -> the daemon's hook", "coredns"), ("ours, dnsmasq nftset", "dnsmasq"),
                ("reference (refresh every 300 s)", "reference"))
        for label, mode in runs:
            res = (rotation_reference(attempts, seconds) if mode == "reference"
                   else rotation_ours(mode, attempts, seconds))
            failed = sum(res["fail"].values())
            print(f"  {label:<40} failures {failed:>5} / {attempts}   ok {res['ok']:>5}   "
                  f"addresses seen {len(res['addresses'])}   {res['fail'] or ''}", flush=True)
    if "latency" not in skip:
        base, ours, ref = latency_bench(2000)
        print("3. connect latency to the last of 1,000 allowed addresses (4 x 2,000 connects, µs)")
        for label, s in (("no firewall", base), ("ours: nftables set", ours),
                         ("reference: 1,000 iptables rules", ref)):
            print(f"  {label:<34} p50 {pct(s, 50):8.1f}   p99 {pct(s, 99):8.1f}")
        print(f"  reference / ours at p50: {pct(ref, 50) / pct(ours, 50):.2f}x "
              f"(extra over no firewall: ours {pct(ours, 50) - pct(base, 50):+.1f} µs, "
              f"reference {pct(ref, 50) - pct(base, 50):+.1f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
