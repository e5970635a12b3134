"""DNS as a channel: the agent's limits at the local DNS server, with and without.

Run as root: ``/opt/ctvenv/bin/python bench/bench_dns_limits.py [--quick] [--backend B]``.
In the test world (codetainer/sandbox/world.py: its own network namespaces, created and removed here)
the local DNS server is CoreDNS as the daemon configures it (generated Corefile, run as
the DNS user, forwarding the allowlisted zones straight to the world's upstream: the
hook's own cost is bench_dnshook's subject), behind the daemon's firewall policy for
that allowlist, applied once with the agent's DNS limit (``CODETAINER_DNS_LIMIT`` and the
name bound, :class:`~codetainer.network.firewall.DnsLimit`) and once without it. As the
agent's uid, side by side in one run:

1. exfiltration: unique names under an allowlisted wildcard (``*.githubusercontent.com``:
   each one reaches the upstream, so its zone's authoritative servers) sent as fast as
   answers come, 64 in flight, for a few seconds; names a second and name bytes a
   second over the whole window and after the burst (the steady rate), for the issue's
   228-character names and for the longest name the bound lets through;
2. an npm-install-like load: 600 distinct allowlisted names, then each again, resolved
   by 16 parallel clients through glibc's ``getaddrinfo`` (A and AAAA, as Node's
   ``dns.lookup`` does), each with a fresh budget (the rules re-applied, as after an idle
   spell); wall time, failed lookups, per-lookup p50 / p99.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from _common import pct
from codetainer.sandbox.world import UPSTREAM, World

AGENT = 1000
LISTEN = "127.0.0.53"
EXFIL_ZONE = "githubusercontent.com"
NPM_ZONE = "registry.bench.test"
ALLOW = f"*.{EXFIL_ZONE}\n*.{NPM_ZONE}\n"

# The attacker: unique names of argv[2] characters under argv[5], as fast as the server
# answers, argv[4] in flight, for argv[3] seconds. A query the kernel drops fails its send
# at once (EPERM); one with no answer in a second is given up. Prints a JSON summary.
EXFIL_PY = r"""
import errno, json, os, select, socket, struct, sys, time
server, zone = sys.argv[1], sys.argv[5]
length, secs, inflight = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
tag = os.urandom(4).hex()
def name(i):
    head = f"{tag}{i:010x}"
    left = length - len(zone) - 1
    body = (head * (left // len(head) + 1))[:left]
    labels, at = [], 0
    while at < left:
        n = min(62, left - at) - (left - at - min(62, left - at) == 1)
        labels.append(body[at:at + n]); at += n + 1
    return ".".join(labels + [zone])
def query(qid, n):
    wire = b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)
assert len(name(0)) == length
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((server, 53)); s.setblocking(False)
pending, seconds = {}, [0] * (int(secs) + 1)
i = sent = answered = dropped = lost = 0
t0 = time.monotonic()
while (now := time.monotonic()) < t0 + secs:
    blocked = False
    while len(pending) < inflight:
        qid = i & 0xFFFF
        if qid in pending:
            break
        try:
            s.send(query(qid, name(i)))
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            dropped += 1; blocked = True; i += 1
            break
        pending[qid] = now; sent += 1; i += 1
    if select.select([s], [], [], 0.001 if blocked else 0.05)[0]:
        while True:
            try:
                reply = s.recv(4096)
            except BlockingIOError:
                break
            qid = struct.unpack("!H", reply[:2])[0]
            if pending.pop(qid, None) is not None:
                answered += 1; seconds[int(time.monotonic() - t0)] += 1
    for qid in [q for q, t in pending.items() if now - t > 1.0]:
        del pending[qid]; lost += 1
print(json.dumps({"answered": answered, "sent": sent, "dropped": dropped, "lost": lost,
                  "seconds": seconds[:int(secs)], "length": length}))
"""

# The npm-like client: getaddrinfo (glibc, A and AAAA) for every name of the file argv[1],
# argv[2] threads. Prints a JSON summary.
NPM_PY = r"""
import json, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
names = json.load(open(sys.argv[1]))
def one(n):
    t = time.monotonic()
    try:
        socket.getaddrinfo(n, 443, type=socket.SOCK_STREAM)
        ok = True
    except socket.gaierror:
        ok = False
    return ok, (time.monotonic() - t) * 1000
t0 = time.monotonic()
with ThreadPoolExecutor(int(sys.argv[2])) as pool:
    results = list(pool.map(one, names))
wall = time.monotonic() - t0
print(json.dumps({"wall": wall, "failed": sum(not ok for ok, _ in results),
                  "lat": sorted(ms for _, ms in results), "lookups": len(names)}))
"""


@dataclasses.dataclass
class Bench:
    world: World
    backend: Any
    with_limit: Any
    without: Any
    tmp: Path

    async def apply(self, limited: bool) -> None:
        # Every apply writes the rules anew: a fresh budget (a new token bucket, full).
        await self.backend.apply(self.with_limit if limited else self.without)

    def exfil(self, length: int, secs: float) -> dict[str, Any]:
        out = self.world.python_in(self.world.inner, EXFIL_PY, LISTEN, str(length), str(secs), "64",
                                   EXFIL_ZONE, uid=AGENT, timeout=secs + 30)
        if out.returncode != 0:
            raise RuntimeError(f"exfil client failed: {out.stderr[-2000:]}")
        return dict(json.loads(out.stdout))

    def npm(self, names: list[str], threads: int) -> dict[str, Any]:
        path = self.tmp / "names.json"
        path.write_text(json.dumps(names))
        path.chmod(0o644)
        resolv = self.tmp / "resolv.conf"
        # glibc reads /etc/resolv.conf: bound over it in a private mount namespace of this
        # process alone (the host's file is untouched).
        script = ('mount --bind "$0" /etc/resolv.conf && exec setpriv --reuid=1000 --regid=1000 '
                  '--clear-groups /usr/bin/python3 -I -c "$1" "$2" "$3"')
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(resolv),
                NPM_PY, str(path), str(threads)]
        out = self.world.run_in(self.world.inner, argv, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"npm-like client failed: {out.stderr[-2000:]}")
        return dict(json.loads(out.stdout))


def drain(stream: Any) -> None:
    """Read a pipe to its end: a server whose log pipe fills up stalls."""
    for _line in stream:
        pass


async def setup(world: World, tmp: Path, backend_name: str) -> Bench:
    from codetainer.network.allowlist import Allowlist, parse_text
    from codetainer.network.compose import build_policy, dns_exec_script, make_plan, parse_options
    from codetainer.network.dnsconfig import Engine
    from codetainer.network.firewall import Runner, make_backend
    from codetainer.settings import Settings

    settings = Settings(dns_user="nobody", upstreams=UPSTREAM, run_dir=str(tmp / "run"),
                        dns_hook="off", proxy="off")
    opts = parse_options(settings, Engine.COREDNS)
    plan = make_plan(Allowlist(tuple(parse_text(ALLOW, "bench"))), opts, backend_name)
    opts.config_path.parent.mkdir(parents=True, exist_ok=True)
    opts.config_path.write_text(plan.config.text)
    opts.exec_path.write_text(dns_exec_script(opts))
    opts.exec_path.chmod(0o755)
    for p in (tmp, tmp / "run", opts.config_path.parent):
        p.chmod(0o755)
    (tmp / "resolv.conf").write_text(f"nameserver {LISTEN}\n")
    with_limit = build_policy(plan, plan.fixed, opts)
    assert with_limit.dns_limit is not None, "CODETAINER_DNS_LIMIT=off: nothing to compare"
    without = dataclasses.replace(with_limit, dns_limit=None)
    backend = make_backend(backend_name, Runner(["ip", "netns", "exec", world.inner]))
    await backend.apply(without)
    dns = world.spawn_in(world.inner, [str(opts.exec_path)])
    for stream in (dns.stdout, dns.stderr):  # its log (a line per denial), read as the daemon does
        threading.Thread(target=drain, args=(stream,), daemon=True).start()
    for _ in range(100):  # until CoreDNS answers
        probe = world.run_in(world.inner, ["dig", "+short", "+time=1", "+tries=1", f"@{LISTEN}",
                                           f"probe.{NPM_ZONE}"])
        if probe.returncode == 0:
            break
    else:
        raise RuntimeError("CoreDNS did not answer")
    return Bench(world, backend, with_limit, without, tmp)


async def run(args: argparse.Namespace) -> None:
    secs = 6.0 if args.quick else 10.0
    rounds = 1 if args.quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="ct-bench-dnslimit-"))
    try:
        await measure(args, tmp, secs, rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def measure(args: argparse.Namespace, tmp: Path, secs: float, rounds: int) -> None:
    distinct, threads = args.names, 16
    with World(ttl=300) as world:
        # Every npm-like run gets names of its own: its first lookups go to the upstream,
        # its repeats come from the server's cache.
        runs = 2 * rounds
        for r in range(runs):
            for i in range(distinct):
                world.records[f"pkg{i}.r{r}.{NPM_ZONE}"] = [f"198.18.{i // 250}.{i % 250 + 1}"]
        world.set_records(f"probe.{NPM_ZONE}", ["198.18.255.1"])
        bench = await setup(world, tmp, args.backend)
        limit = bench.with_limit.dns_limit
        fits = limit.max_name + 23  # a bare query: the bound's EDNS allowance is the name's
        print(f"== {args.backend}: the agent's DNS limit {limit.rate}/s, burst {limit.burst} packets, "
              f"names up to {limit.max_name} characters (a bare query: {fits}) ==", flush=True)

        print(f"\n-- exfiltration, unique names under *.{EXFIL_ZONE}, {secs:.0f} s, 64 in flight --")
        print(f"{'':<28} {'names/s':>9} {'KiB/s':>8}   {'steady names/s':>14} {'KiB/s':>8}   "
              f"{'dropped by the kernel':>21}")
        steady_from = 3 if args.quick else 5
        for length in (228, fits):
            for limited in (False, True):
                await bench.apply(limited)
                ex = bench.exfil(length, secs)
                rate = ex["answered"] / secs
                tail = ex["seconds"][steady_from:]
                steady = sum(tail) / max(1, len(tail))
                label = f"{length}-char names, {'limited' if limited else 'no limit'}"
                print(f"{label:<28} {rate:>9.0f} {rate * length / 1024:>8.1f}   {steady:>14.0f} "
                      f"{steady * length / 1024:>8.2f}   {ex['dropped']:>21,}", flush=True)

        print(f"\n-- npm-install-like: {distinct} distinct names then each again ({2 * distinct} "
              f"getaddrinfo, A+AAAA), {threads} clients; fresh budget each run, alternating --")
        results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        r = 0
        for _ in range(rounds):
            for limited in (False, True):
                names = [f"pkg{i}.r{r}.{NPM_ZONE}" for i in range(distinct)]
                r += 1
                await bench.apply(limited)
                results[limited].append(bench.npm(names + names, threads))
        print(f"{'':<12} {'wall s (median)':>16} {'runs':>22} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}")
        for limited in (False, True):
            rs = results[limited]
            walls = [x["wall"] for x in rs]
            lat = sorted(v for x in rs for v in x["lat"])
            print(f"{'limited' if limited else 'no limit':<12} {statistics.median(walls):>16.3f} "
                  f"{' / '.join(f'{w:.3f}' for w in walls):>22} {sum(x['failed'] for x in rs):>7} "
                  f"{pct(lat, 50) if lat else 0.0:>8.2f} {pct(lat, 99) if lat else 0.0:>8.2f}")
        await bench.backend.teardown()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter windows, one npm-like round")
    ap.add_argument("--backend", choices=("nftables", "iptables"), default="nftables")
    ap.add_argument("--names", type=int, default=600, help="distinct names of the npm-like load")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_dns_limits: run as root (it builds network namespaces)")
        return 2
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
