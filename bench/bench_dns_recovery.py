"""DNS recovery: how soon the local DNS server answers again after it is killed.

Run as root: ``/opt/ctvenv/bin/python bench/bench_dns_recovery.py [--engine dnsmasq|coredns]
[--kills 100] [--loop 20]``. codetainerd runs as PID 1 in the test world's inner netns with
the network steps and the shipped ``dns`` program settings (``startsecs=1``,
``startretries=5``); every engine runs in turn (both when a ``coredns`` binary is on PATH).
A prober in the container's netns kills the server (SIGKILL, found by name in that netns)
and asks for an allowlisted name every 2 ms until the first answer with an address.
Prints, per engine:

1. a healthy server (RUNNING) killed ``--kills`` times: the supervisor restarts it at once;
   kill to first allowlisted answer, median and max (target <= 1 s each);
2. a crash loop: killed as soon as it answers, ``--loop`` times in a row. It never reaches
   RUNNING, so the supervisor backs off (1, 2, ... 5 s), gives up (FATAL), and the
   daemon's guard starts it again (backoff capped at 30 s): each kill to the next answer,
   max, and whether every one came back within the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from codetainer.network.dnsguard import REVIVE_MAX_S
from codetainer.sandbox.daemonproc import DaemonProc
from codetainer.sandbox.netdaemon import RECORDS, start_daemon, wait_boot
from codetainer.sandbox.world import PYTHON, World

# Runs in the container's netns as root: "kill N" kills the server and waits for an answer,
# N times in a row, each kill as soon as the previous wait answered; prints the waits (s).
_PROBER = r"""
import json, os, signal, socket, struct, sys, time
engine, server, name = sys.argv[1], sys.argv[2], sys.argv[3]
qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
me = os.readlink("/proc/self/ns/net")
def server_pid():
    # the engine's main process in this netns (dnsmasq forks children for TCP)
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != me:
                continue
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if comm == engine:
            found[int(pid)] = ppid
    mains = [p for p, pp in found.items() if pp not in found]
    return mains[0] if len(mains) == 1 else None
def answers(qid):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.05)
    try:
        s.sendto(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + b"\0\1\0\1",
                 (server, 53))
        data = s.recv(512)
    except OSError:
        return False
    finally:
        s.close()
    rid, flags, _qd, an = struct.unpack(">HHHH", data[:8])
    return rid == qid and flags & 0xF == 0 and an > 0
print("ready", flush=True)
for line in sys.stdin:
    waits = []
    for i in range(int(line.split()[1])):
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline:
            pid = server_pid()
            if pid is None:
                time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        qid = 1
        while not answers(qid & 0xFFFF):
            qid += 1
            if time.monotonic() - t0 > 120:
                print(json.dumps({"error": f"no answer 120 s after kill {i + 1}"}), flush=True)
                sys.exit(1)
            time.sleep(0.002)
        waits.append(time.monotonic() - t0)
    print(json.dumps({"waits": waits}), flush=True)
"""


class Prober:
    def __init__(self, world: World, engine: str) -> None:
        self.proc = world.spawn_in(world.inner, [PYTHON, "-I", "-c", _PROBER, engine,
                                                 "127.0.0.53", "allowed.test"])
        if self._line() != "ready":
            raise SystemExit("the prober did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise SystemExit(f"the prober died: {err[-2000:]}")
        return line

    def kill(self, times: int) -> list[float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"kill {times}\n")
        self.proc.stdin.flush()
        out: dict[str, Any] = json.loads(self._line())
        if "error" in out:
            raise SystemExit(out["error"])
        return [float(w) for w in out["waits"]]


def wait_running(d: DaemonProc) -> dict[str, Any]:
    svc: dict[str, Any] = d.wait_until(lambda: (s := d.service("dns"))["state"] == "RUNNING" and s,
                                       120, "dns RUNNING")
    return svc


def ms(v: float) -> str:
    return f"{v * 1000:.0f} ms"


def run_engine(engine: str, kills: int, loop: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ct-bench-dns-", dir="/tmp"))
    os.chmod(tmp, 0o1777)  # the DNS user reads its config here
    try:
        with World() as world:
            for name, addrs in RECORDS.items():
                world.set_records(name, addrs)
            d = start_daemon(world, tmp, engine=engine)
            try:
                if wait_boot(d)["state"] != "READY":
                    raise SystemExit(f"[{engine}] boot did not reach READY:\n{d.log()[-3000:]}")
                prober = Prober(world, engine)
                before = wait_running(d)["restarts"]
                waits = []
                for _ in range(kills):
                    wait_running(d)
                    waits += prober.kill(1)
                restarts = wait_running(d)["restarts"] - before
                revivals = d.status()["network"]["dns_guard"]["revivals"]
                print(f"[{engine}] RUNNING server, SIGKILL x{kills}: {len(waits)} recoveries "
                      f"({restarts} restarts, {revivals} by the guard); kill -> first allowlisted "
                      f"answer median {ms(statistics.median(waits))}, max {ms(max(waits))} "
                      f"(target <= 1000 ms each: {'met' if max(waits) <= 1.0 else 'NOT met'})",
                      flush=True)
                t0 = time.monotonic()
                waits = prober.kill(loop)
                took = time.monotonic() - t0
                guard = d.status()["network"]["dns_guard"]
                cap = REVIVE_MAX_S + 1.0  # the cap, plus a start
                print(f"[{engine}] crash loop, killed as soon as it answers x{loop} ({took:.0f} s): "
                      f"answered again after every kill; waits "
                      f"{', '.join(f'{w:.1f}' for w in waits)} s; max {max(waits):.1f} s "
                      f"(within the {REVIVE_MAX_S:.0f} s backoff cap: "
                      f"{'yes' if max(waits) <= cap else 'NO'}); the guard started it "
                      f"{guard['revivals']}x after the supervisor gave up", flush=True)
                wait_running(d)
                d.wait_until(lambda: d.status()["state"] == "READY", 60, "READY again")
            finally:
                d.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("dnsmasq", "coredns"), action="append",
                    help="engine to run (repeatable; default: both when coredns is on PATH)")
    ap.add_argument("--kills", type=int, default=100, help="kills of a RUNNING server")
    ap.add_argument("--loop", type=int, default=20, help="kills in the crash loop")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, nftables)")
    engines = args.engine or ["dnsmasq", *(["coredns"] if shutil.which("coredns") else [])]
    for engine in engines:
        if engine == "coredns" and shutil.which("coredns") is None:
            raise SystemExit("no coredns binary on PATH: ./dev setup builds it")
        run_engine(engine, args.kills, args.loop)


if __name__ == "__main__":
    main()
