"""DNS hook benchmark: one insertion process per transaction against the persistent helper.

Run as root: ``/opt/ctvenv/bin/python bench/bench_dnshook.py [--quick]``. In a network
namespace of its own (created and removed here) holding the dynamic sets as the firewall
declares them, the daemon's hook (:class:`~codetainer.network.dnshook.DnsHook`, in a
process of its own as in the daemon) forwards to a stand-in upstream (its own process,
a new address in 198.18.0.0/15 for every answer) and inserts every answer before it
replies. The same client load goes through the hook with each writer, side by side:

* ``none``: a writer that inserts nothing (the hook's own cost: the baseline);
* ``nft, process per transaction``: ``nft -f -`` per transaction (the writer before);
* ``nft, persistent helper``: the writer now (:class:`~codetainer.network.setwriter.SetHelper`);
* the same two for the iptables backend (``ipset restore`` per transaction / helper).

Printed per writer: answers a second for unique names asked one at a time (the issue's
measure, 76-81/s through the hook) and with 32 in flight; the latency per answer at low
load (one in flight), p50 / p99, and what the writer adds over ``none``; and that the
kernel set holds every answered address afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from _common import pct

ROOT = Path(__file__).resolve().parents[1]

#: the set each writer fills (its own, so what it holds can be counted)
SET_OF = {"none": "d4_80", "nft-oneshot": "d4_443", "nft": "d4_8443",
          "ipset-oneshot": "d4_443", "ipset": "d4_8443"}
SETS = "table inet codetainer {\n" + "".join(
    f"    set {n} {{ type ipv4_addr; flags timeout; timeout 660s; size 262144; }}\n"
    for n in sorted(set(SET_OF.values()))) + "}\n"
UPSTREAM = ("127.0.0.2", 53)

# A stand-in upstream: answers every question with one A record, a new address each time.
UPSTREAM_PY = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.2", 53))
print("ready", flush=True)
n = 0
while True:
    data, addr = s.recvfrom(4096)
    end = 12
    while data[end]:
        end += data[end] + 1
    end += 5  # the root label, QTYPE, QCLASS
    n += 1
    ip = bytes([198, 18 + (n >> 16 & 1), n >> 8 & 255, n & 255])
    head = data[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0)
    s.sendto(head + data[12:end] + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + ip, addr)
"""

# The hook as the daemon runs it, with the writer named in argv[1], on argv[2], filling
# the set argv[3].
HOOK_PY = r"""
import asyncio, sys
from codetainer.network.dnsconfig import parse_upstreams
from codetainer.network.dnshook import DnsHook, SetRoutes
from codetainer.network.setwriter import IpsetWriter, NftSetWriter, SetWriter

class Nothing(SetWriter):
    async def add(self, elements):
        pass

async def main():
    kind = sys.argv[1]
    writer = {"none": lambda: Nothing(),
              "nft-oneshot": lambda: NftSetWriter(persistent=False),
              "nft": lambda: NftSetWriter(),
              "ipset-oneshot": lambda: IpsetWriter(persistent=False),
              "ipset": lambda: IpsetWriter()}[kind]()
    hook = DnsHook(sys.argv[2], parse_upstreams("127.0.0.2"), SetRoutes({"bench.test": (sys.argv[3],)}),
                   writer, allowed=lambda n: True, sock_uid=None, timeout=2.0)
    await hook.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

WRITERS = [
    ("none", "none (no insertion: the hook alone)"),
    ("nft-oneshot", "nft, process per transaction (before)"),
    ("nft", "nft, persistent helper (now)"),
    ("ipset-oneshot", "ipset restore per transaction (before)"),
    ("ipset", "ipset, persistent helper (now)"),
]


def query(qid: int, name: str) -> bytes:
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)


def ok_answer(reply: bytes) -> bool:
    flags, _qd, an = struct.unpack("!HHH", reply[2:8])
    return flags & 0x000F == 0 and an == 1


def name(kind: str, run: str, i: int) -> str:
    # a long unique first label (the names were 228 bytes)
    return f"{uuid.uuid4().hex}{i:08d}.{run}.{kind.replace('-', '')}.bench.test"


def sequential(hook: tuple[str, int], kind: str, n: int) -> dict[str, Any]:
    """One query at a time: latency per answer and answers a second."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5.0)
    s.connect(hook)
    lat: list[float] = []
    bad = 0
    t0 = time.perf_counter()
    for i in range(n):
        q = query(i & 0xFFFF, name(kind, "seq", i))
        t = time.perf_counter()
        s.send(q)
        reply = s.recv(4096)
        lat.append((time.perf_counter() - t) * 1000)
        bad += not ok_answer(reply)
    wall = time.perf_counter() - t0
    s.close()
    return {"rate": n / wall, "lat": lat, "bad": bad, "wall": wall}


def concurrent(hook: tuple[str, int], kind: str, n: int, inflight: int) -> dict[str, Any]:
    """``inflight`` queries outstanding at all times; answers a second."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(hook)
    s.setblocking(False)
    sent = answered = bad = 0
    t0 = time.perf_counter()
    while answered < n:
        while sent < n and sent - answered < inflight:
            s.send(query(sent & 0xFFFF, name(kind, "par", sent)))
            sent += 1
        if not select.select([s], [], [], 10.0)[0]:
            raise RuntimeError(f"{kind}: no answer in 10 s ({answered}/{n} answered)")
        while True:
            try:
                reply = s.recv(4096)
            except BlockingIOError:
                break
            answered += 1
            bad += not ok_answer(reply)
    wall = time.perf_counter() - t0
    s.close()
    return {"rate": n / wall, "bad": bad}


def in_set(kind: str) -> int:
    name = SET_OF[kind]
    if kind.startswith("ipset"):
        out = subprocess.run(["ipset", "list", "-t", f"ct-{name}"], capture_output=True, text=True).stdout
        return int(out.split("Number of entries:")[1].split()[0])
    out = subprocess.run(["nft", "-j", "list", "set", "inet", "codetainer", name],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out)["nftables"][1]["set"].get("elem", []))


def helper_memory_kib(parent: int) -> tuple[int, int] | None:
    """(RSS, PSS) of the hook's helper process: PSS counts the pages it shares with the
    daemon's interpreter once between them."""
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if b"sethelper" in (entry / "cmdline").read_bytes():
                lines = (entry / "smaps_rollup").read_text().splitlines()[1:]
                rollup = dict(line.split(":", 1) for line in lines)
                return int(rollup["Rss"].split()[0]), int(rollup["Pss"].split()[0])
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return None


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the hook logs to stdout too (a few lines, then quiet)
        if line.strip() == "ready":
            return proc
        seen.append(line)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{args or 'upstream'} did not start: {''.join(seen)[-2000:]}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def inner(n_seq: int, n_par: int, inflight: int) -> dict[str, Any]:
    """Every writer's hook up at once; the one-at-a-time queries go round the hooks in
    rounds of 50 (the machine's noise falls on all alike; each round starts with two
    unmeasured queries, as the first after a pause is slow for every hook alike), then
    each hook's concurrent run."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], capture_output=True)
    subprocess.run(["nft", "-f", "-"], input=SETS, text=True, check=True)
    for name in ("d4_443", "d4_8443"):
        subprocess.run(["ipset", "create", f"ct-{name}", "hash:ip", "timeout", "660", "maxelem", "262144"],
                       check=True)
    upstream = spawn(UPSTREAM_PY)
    hooks: dict[str, subprocess.Popen[str]] = {}
    addr = {kind: ("127.0.0.1", port) for port, (kind, _) in enumerate(WRITERS, start=5401)}
    seq: dict[str, dict[str, Any]] = {kind: {"lat": [], "wall": 0.0, "bad": 0} for kind in addr}
    results: dict[str, Any] = {}
    try:
        for kind, (host, port) in addr.items():
            hooks[kind] = spawn(HOOK_PY, kind, f"{host}:{port}", SET_OF[kind])
            sequential(addr[kind], kind, 20)  # warm: the helper starts, the caches fill
        for r in range(0, n_seq, 50):
            for kind, where in addr.items():
                sequential(where, kind, 2)  # unmeasured: wake the hook after its pause
                part = sequential(where, kind, min(50, n_seq - r))
                seq[kind]["lat"] += part["lat"]
                seq[kind]["wall"] += part["wall"]
                seq[kind]["bad"] += part["bad"]
        for kind, where in addr.items():
            par = concurrent(where, kind, n_par, inflight)
            results[kind] = {"seq": {**seq[kind], "rate": n_seq / seq[kind]["wall"]}, "par": par,
                             "helper_kib": helper_memory_kib(hooks[kind].pid)}
    finally:
        for proc in hooks.values():
            stop(proc)
        stop(upstream)
    for kind in addr:
        results[kind].update(held=in_set(kind), asked=20 + n_seq + n_par + 2 * -(-n_seq // 50))
    return results


def report(res: dict[str, Any], inflight: int) -> None:
    base = res["none"]["seq"]["lat"]
    print(f"{'writer':<42} {'1 in flight':>12} {f'{inflight} in flight':>13} "
          f"{'latency p50 / p99 ms':>22} {'added p50 / p99 ms':>20}  set holds")
    for kind, label in WRITERS:
        r = res[kind]
        lat = r["seq"]["lat"]
        added = ("" if kind == "none" else
                 f"{pct(lat, 50) - pct(base, 50):+8.3f} / {pct(lat, 99) - pct(base, 99):+7.3f}")
        held = "-" if kind == "none" else f"{r['held']}/{r['asked']}"
        bad = r["seq"]["bad"] + r["par"]["bad"]
        print(f"{label:<42} {r['seq']['rate']:>8.0f} a/s {r['par']['rate']:>9.0f} a/s "
              f"{pct(lat, 50):>10.3f} / {pct(lat, 99):>7.3f}   {added:>20}  {held}"
              + (f"  ({bad} not NOERROR)" if bad else ""))
    for kind in ("nft", "ipset"):
        once, kept = res[f"{kind}-oneshot"], res[kind]
        mem = kept["helper_kib"] or (0, 0)
        one = kept["seq"]["rate"] / once["seq"]["rate"]
        many = kept["par"]["rate"] / once["par"]["rate"]
        print(f"{kind}: persistent / per-transaction, one in flight {one:.1f}x, "
              f"{inflight} in flight {many:.1f}x; "
              f"helper RSS {mem[0] / 1024:.1f} MiB, PSS {mem[1] / 1024:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 sequential, 2,000 concurrent queries")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_seq, n_par, inflight = (300, 2000, 32) if args.quick else (1000, 5000, 32)
    if args.inner:
        print(json.dumps(inner(*json.loads(args.inner))))
        return 0
    if os.geteuid() != 0:
        print("bench_dnshook: run as root (it builds a network namespace)")
        return 2
    ns = f"ct-bench-hook-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        print(f"== DNS hook: {n_seq:,} unique names one at a time, then {n_par:,} with {inflight} "
              "in flight, per writer ==", flush=True)
        argv = [sys.executable, __file__, "--inner", json.dumps([n_seq, n_par, inflight])]
        out = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            return 1
        report(json.loads(out.stdout.strip().splitlines()[-1]), inflight)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
