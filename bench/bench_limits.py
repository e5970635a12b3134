"""The daemon stays responsive while the agent spins every core; what real work needs.

Run as root: ``/opt/ctvenv/bin/python bench/bench_limits.py [-n 200]``. For each way the
agent's CPU can be held back, boots the whole codetainer as PID 1 in a scratch root
joined to the test world (inside cgroups the benchmark makes, sandbox/cgroups.py), then
times ``n`` ``status`` requests in a row (a fresh connection each, as the CLI makes), first
idle and then while the agent runs two busy processes per core, started in its own shell
pane, ``--rounds`` times (a p99 of 200 is the third-worst request: one round is noise);
prints each round's p99 idle and busy side by side, the p50s and the median ratio
(target: p99 under load within 3x of idle). The modes:

* ``cgroup v1``: the agent in its own cpu cgroup (weight 20 against the daemon's 100)
  and at nice 10, as in a container whose cgroups are writable;
* ``rlimit only``: no cgroup the daemon can see (the machine's tasks share one cpu
  cgroup, as in a container with read-only cgroups): nice 10 alone;
* ``rlimit only, root cpu cgroup``: the machine's tasks in the host's root cpu cgroup,
  where the kernel's autogroups apply (``kernel.sched_autogroup_enabled``), as on a VM;
* ``no limits (nice 0)``: the second mode with ``CODETAINER_AGENT_NICE=0``, for contrast.

``--workloads`` instead measures the most tasks (processes and threads, what
RLIMIT_NPROC and pids.max count) of real work at 8-way parallelism, the evidence behind
``CODETAINER_AGENT_PIDS``: ``make -j8`` of 64 C files, ``go build -a -p 8`` of net/http
(GOMAXPROCS=8), and, fetching from the npm and PyPI registries, ``npm install`` of
typescript, eslint and jest, ``jest --maxWorkers=8`` and ``pytest -n 8`` (pytest-xdist).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import pct
from codetainer.cli.render import limits_mode
from codetainer.control import protocol
from codetainer.sandbox.cgroups import SandboxCgroups
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import FullBoot, default_names, publish_names
from codetainer.sandbox.world import World

SPIN = r"""import os, sys, time
kids = []
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        while True:
            pass
    kids.append(pid)
mark = "/scratch-out/spin-" + sys.argv[2]
open(mark + ".ready", "w").close()
end = time.monotonic() + 300
while not os.path.exists(mark + ".release") and time.monotonic() < end:
    time.sleep(0.1)
for pid in kids:
    os.kill(pid, 9)
"""

MODES = {  # name: (controllers the sandbox has, shown inside, extra settings)
    "cgroup v1": (("memory", "pids", "cpu"), True, {}),
    "rlimit only": (("memory", "pids", "cpu"), False, {}),
    "rlimit only, root cpu cgroup": (("memory", "pids"), False, {}),
    "no limits (nice 0)": (("memory", "pids", "cpu"), False, {"CODETAINER_AGENT_NICE": "0"}),
}


def status_latencies(sock: str, n: int) -> list[float]:
    out = []
    request = protocol.request("status", tail=False)
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            s.sendall(request)
            with s.makefile("rb") as f:
                f.readline()
        out.append(time.perf_counter() - t0)
    return out


def as_agent_in_shell(fb: FullBoot, line: str) -> None:
    shell = next(p for p in fb.status()["session"]["panes"] if p["role"] == "shell")
    r = fb.inside("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--", "tmux",
                  "-S", "/run/codetainer/tmux/agent.sock", "send-keys", "-t", shell["id"],
                  line, "Enter")
    if r.returncode != 0:
        raise SystemExit(f"send-keys failed: {r.stderr}")


def one_mode(name: str, n: int, spinners: int,
             rounds: int) -> tuple[list[list[float]], list[list[float]], str]:
    """Per round: ``n`` requests idle, then ``n`` while the agent spins."""
    controllers, show, extra = MODES[name]
    with World(ttl=60) as world, SandboxCgroups(memory=2 << 30, pids=2000,
                                                controllers=controllers) as cg:
        publish_names(world, default_names())
        base = Path(tempfile.mkdtemp(prefix="ct-bench-limits-"))
        base.chmod(0o755)
        fb = FullBoot(world, base, env=extra, cgroups=cg.dirs, show_cgroups=show)
        try:
            st = fb.wait_boot()
            if st["state"] != "READY":
                raise SystemExit(f"{name}: boot ended {st['state']}: {st['reasons']}")
            fb.wait_session()
            wait_for(lambda: len(fb.status()["session"]["panes"]) == 2, 30, "panes")
            mode = limits_mode(fb.status()["limits"])
            (fb.root.out / "spin.py").write_text(SPIN)
            status_latencies(fb.socket, 50)  # warm up
            idle, busy = [], []
            for r in range(rounds):
                time.sleep(1.0)  # the last round's spinners are gone
                idle.append(status_latencies(fb.socket, n))
                as_agent_in_shell(fb, f"python3 /scratch-out/spin.py {spinners} {r}")
                wait_for((fb.root.out / f"spin-{r}.ready").exists, 30, "the agent spinning")
                time.sleep(2.0)  # let the scheduler see the spinners as the hogs they are
                busy.append(status_latencies(fb.socket, n))
                (fb.root.out / f"spin-{r}.release").write_text("")
            fb.stop()
        finally:
            fb.close()
            shutil.rmtree(base, ignore_errors=True)
    return idle, busy, mode


def latency(args: argparse.Namespace) -> None:
    spinners = 2 * (os.cpu_count() or 1)
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(f"status latency, {args.rounds} rounds of {args.n} requests in a row, idle then "
          f"while the agent runs {spinners} busy processes ({os.cpu_count()} cores; "
          f"autogroups {'on' if autogroup.exists() and autogroup.read_text().strip() == '1' else 'off'}"
          "); per round p99 idle/busy, then p50s and the median p99 ratio (target <= 3x)")
    for name in args.modes or list(MODES):
        idle, busy, mode = one_mode(name, args.n, spinners, args.rounds)
        ratios = [pct(b, 99) / pct(i, 99) for i, b in zip(idle, busy, strict=True)]
        rounds = ", ".join(f"{pct(i, 99) * 1e3:.1f}/{pct(b, 99) * 1e3:.1f}"
                           for i, b in zip(idle, busy, strict=True))
        every_idle = [x for r in idle for x in r]
        every_busy = [x for r in busy for x in r]
        ratio = statistics.median(ratios)
        print(f"{name:<30} p99 ms {rounds}; p50 {pct(every_idle, 50) * 1e3:.2f}/"
              f"{pct(every_busy, 50) * 1e3:.2f} ms; ratio {ratio:.1f}x"
              f"{'' if ratio <= 3 else '  (over the target)'}")
        print(f"  ({mode})")


# -- workloads -------------------------------------------------------------------------------

def peak_tasks(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, int, float, int]:
    """Run ``argv`` in a session of its own; (most tasks, most processes, seconds, exit)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tasks = procs = 0
    while proc.poll() is None:
        t = p = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path("/proc", entry, "stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if int(fields[3]) == proc.pid:  # its session
                p, t = p + 1, t + int(fields[17])
        tasks, procs = max(tasks, t), max(procs, p)
        time.sleep(0.01)
    return tasks, procs, time.monotonic() - t0, proc.returncode


def workloads() -> None:
    work = Path(tempfile.mkdtemp(prefix="ct-workloads-"))
    env = {**os.environ, "GOMAXPROCS": "8", "GOCACHE": str(work / "gocache"),
           "GOTOOLCHAIN": "local", "npm_config_cache": str(work / "npmcache")}
    c = work / "c"
    c.mkdir()
    for i in range(64):
        (c / f"f{i}.c").write_text(f"int f{i}(int x) {{ int a[100]; for (int i = 0; i < 100; "
                                   f"i++) a[i] = x * i; return a[x % 100]; }}\n")
    (c / "Makefile").write_text("OBJS=$(patsubst %.c,%.o,$(wildcard *.c))\nall: $(OBJS)\n"
                                "%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n")
    js = work / "js"
    (js / "t").mkdir(parents=True)
    (js / "package.json").write_text('{"name": "m", "version": "1.0.0", "private": true}')
    for i in range(16):
        (js / "t" / f"a{i}.test.js").write_text(
            f"test('t{i}', () => {{ let s = 0; for (let i = 0; i < 3e7; i++) s += i; "
            "expect(s).toBeGreaterThan(0); });\n")
    py = work / "py"
    (py / "t").mkdir(parents=True)
    for i in range(16):
        (py / "t" / f"test_{i}.py").write_text(f"def test_{i}():\n    sum(range(3000000))\n")
    runs = [
        ("make -j8, 64 C files", ["make", "-j8"], c, "make"),
        ("go build -a -p 8 net/http", ["go", "build", "-a", "-p", "8", "net/http"], work, "go"),
        ("npm install typescript eslint jest", ["npm", "install", "--no-audit", "--no-fund",
                                                "typescript@5", "eslint@8", "jest@29"], js, "npm"),
        ("jest --maxWorkers=8, 16 files", ["npx", "jest", "--maxWorkers=8", "t"], js, "npx"),
        (None, ["/usr/bin/python3", "-m", "venv", str(py / "v")], py, "python3"),
        (None, [str(py / "v/bin/pip"), "install", "-q", "pytest-xdist"], py, "python3"),
        ("pytest -n 8, 16 files", [str(py / "v/bin/pytest"), "-q", "-n", "8", "t"], py,
         "python3"),
    ]
    print("most tasks (processes and threads) of real work, 8-way:")
    for label, argv, cwd, tool in runs:  # label None: preparation, not measured
        if shutil.which(tool) is None:
            print(f"  {label or argv[0]:<40} skipped: no {tool}")
            continue
        tasks, procs, secs, rc = peak_tasks(argv, cwd, env)
        if label:
            print(f"  {label:<40} {tasks:5d} tasks, {procs:4d} processes ({secs:.1f} s, "
                  f"exit {rc})")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200, help="status requests per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="idle/busy rounds per mode")
    ap.add_argument("--mode", dest="modes", action="append", choices=list(MODES))
    ap.add_argument("--workloads", action="store_true",
                    help="measure the tasks of real work instead (fetches packages)")
    args = ap.parse_args()
    if args.workloads:
        workloads()
    else:
        latency(args)


if __name__ == "__main__":
    main()
