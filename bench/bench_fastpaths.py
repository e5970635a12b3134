#!/usr/bin/env python3
"""Issue 10's four fast-path figures, for this checkout and a baseline side by side.

Run as root::

    git worktree add /work/baseline-REV REV          # the commit to compare with
    /opt/ctvenv/bin/python bench/bench_fastpaths.py --baseline /work/baseline-REV

Each tree's code runs with ``PYTHONPATH`` starting with its ``daemon/`` (the venv's
editable install comes after it): the daemon, the CLI, and for attach the harness's
session manager and control server too (that worker runs in the tree). The daemons are
booted by this checkout's sandbox kit (``codetainer.sandbox``, in a worker that runs
this checkout), so a baseline from before the kit works. The trees alternate round by
round, so both see the same machine load:

* **attach**: ``codetainer attach`` with the session up, process start to tmux's
  alternate screen on a fresh pseudo-terminal (``bench/bench_attach.py``'s harness),
  against a bare ``tmux attach`` (the floor) in the same round;
* **status**: ``codetainer status`` end to end (process start to exit) against a daemon
  booted READY, plus the top imports of one ``python -X importtime`` run of it;
* **idle RSS**: init + daemon after boot and ``--idle`` seconds (the daemon of
  ``bench/bench_daemon.py``: codetainerd as PID 1, the tree's services file plus one idle
  program), and the extension modules the daemon keeps mapped;
* **boot**: the whole codetainer booted as PID 1 in a scratch root joined to the test
  world (``bench/bench_boot.py``), exec to READY seen over the socket, and the daemon's
  own boot duration.

The attach line also gives the part of it spent in the daemon's ``session`` reply.
``--floor`` also prints the attach path's links each alone (interpreter starts, the drop,
the seccomp loader), and what the daemon keeps: the RSS each of its imports adds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import pct

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
KINDS = ("attach", "status", "boot")
ATTACH_TARGET_RATIO = 3.0
STATUS_TARGET_MS = 35.0
RSS_TARGET_MIB = 35.0
BOOT_TARGET_MS = 300.0


def tree_env(tree: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(tree / "daemon")}


def tree_command(tree: Path, bindir: str) -> str:
    """The tree's ``codetainer``, put in ``bindir``: its sh front where it has one, beside
    the venv's Python CLI (which runs the tree's code through ``PYTHONPATH``), else that
    Python CLI itself (a tree from before the front)."""
    front = tree / "daemon" / "scripts" / "codetainer"
    cli = Path(bindir, "codetainer")
    if front.exists():
        shutil.copy(front, cli)
        Path(bindir, "codetainer-cli").symlink_to(VENV_BIN / "codetainer-cli")
    else:
        cli.symlink_to(VENV_BIN / "codetainer-cli")
    return str(cli)


# -- workers ------------------------------------------------------------------------------


def work_attach(tree: Path, n: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_attach import session_up, time_attach  # the tree's harness imports
    from codetainer.control.client import call

    with session_up("ct-bench-fast-") as s, tempfile.TemporaryDirectory() as bindir:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color",
               "HOME": str(s.base), "LANG": "C.UTF-8", **tree_env(tree)}
        ours = [tree_command(tree, bindir), "--socket", s.ctl, "attach"]
        bare = s.bare_argv()
        time_attach(ours, env, s.tmux_socket)  # warm the page cache
        time_attach(bare, env, s.tmux_socket)
        out: dict[str, list[float]] = {"ours": [], "bare": [], "session_op": []}
        for _ in range(n):  # interleaved: both see the same moment's load
            out["ours"].append(time_attach(ours, env, s.tmux_socket))
            out["bare"].append(time_attach(bare, env, s.tmux_socket))
            t0 = time.perf_counter()  # the part of an attach spent in the daemon's reply
            call("session", s.ctl, timeout=10)
            out["session_op"].append(time.perf_counter() - t0)
        return out


def importtime_top(argv: list[str], env: dict[str, str], k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` slowest imports of one run of ``argv`` (cumulative ms), of those made at
    the top level or by a top-level one (indented), and the sum of the top level."""
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env,
                       capture_output=True, text=True, check=False)
    top: list[tuple[str, float]] = []
    total = 0.0
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)$", line)
        if m and len(m[2]) <= 3:  # depth 0 (one space) or 1 (three)
            top.append((m[2][1:] + m[3], int(m[1]) / 1000))
            total += int(m[1]) / 1000 if len(m[2]) == 1 else 0.0
    top.sort(key=lambda t: -t[1])
    return [("(all imports)", total), *top[:k]]


def mapped_extensions(pid: int) -> list[str]:
    """Shared objects of Python packages and of libraries loaded by them (not libc's)."""
    seen: set[str] = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            path = parts[5] if len(parts) >= 6 else ""
            if ".so" in path and ("site-packages" in path or "lib-dynload" in path
                                  or "seccomp" in path or "ssl" in path or "crypto" in path):
                seen.add(os.path.basename(path))
    return sorted(seen)


def work_daemon(tree: Path, n: int, idle: float) -> dict[str, Any]:
    import psutil
    from codetainer.sandbox.daemonproc import DaemonProc

    conf = (tree / "supervisord" / "codetainer.conf").read_text()
    conf += "\n[program:idle]\ncommand=/bin/sleep 100000\nstartsecs=0\n"
    tmp = Path(tempfile.mkdtemp(prefix="ct-bench-fast-"))
    bindir = tempfile.mkdtemp(prefix="ct-bench-bin-")
    d = DaemonProc(tmp, conf, env={"CODETAINER_LOG_LEVEL": "info", **tree_env(tree)})
    try:
        d.wait_socket()
        d.wait_until(lambda: d.status()["state"] == "READY", what="READY")
        init = psutil.Process(d.init_pid)
        daemon = init.children()[0]
        time.sleep(idle)  # the idle window is what is measured
        rss = [init.memory_info().rss, daemon.memory_info().rss]
        uss = [p.memory_full_info().uss for p in (init, daemon)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **tree_env(tree)}
        cli = [tree_command(tree, bindir), "--socket", d.socket, "status"]
        subprocess.run(cli, env=env, capture_output=True, check=False)  # warm
        walls = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cli, env=env, capture_output=True, check=False)
            walls.append(time.perf_counter() - t0)
        return {"rss": rss, "uss": uss, "status": walls,
                "importtime": importtime_top([str(VENV_BIN / "codetainer-cli"), *cli[1:]], env),
                "extensions": mapped_extensions(daemon.pid)}
    finally:
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(bindir, ignore_errors=True)


def work_boot(tree: Path, n: int) -> dict[str, Any]:
    from bench_boot import timed_boots
    from codetainer.network.allowlist import load_allowlist
    from codetainer.sandbox.fullboot import publish_names
    from codetainer.sandbox.world import World

    allow = load_allowlist(tree / "network" / "domains.conf")
    names = sorted({*allow.names, *(f"www.{w}" for w in allow.wildcards)})
    conf = (tree / "supervisord" / "codetainer.conf").read_text()
    binds = () if tree == ROOT else ((str(tree), str(tree), True),)
    with World(ttl=60) as world:
        publish_names(world, names)
        b = timed_boots(world, n, tree_env(tree), services=conf, binds=binds)
    return {"wall": b.walls, "boot": b.boots, "steps": dict(b.steps), "rss_ready": b.rss}


# -- the floor of the attach chain ---------------------------------------------------------


def floor() -> None:
    """Each link of the attach path alone, process start to exit, median of 30 (the links
    take turns, so a moment's load hits them alike)."""
    from codetainer.boot import chain, seccomp

    venv = str(VENV_BIN / "python")
    loader = list(seccomp.loader_argv())
    py_loader = chain.loader_argv(seccomp.filter_hex(), native=False)
    drop = ["setpriv", "--reuid=64125", "--regid=64125", "--clear-groups", "--no-new-privs",
            "--bounding-set=-all", "--"]
    rows = [
        ("/bin/true", ["/bin/true"]),
        ("tmux -V", ["tmux", "-V"]),
        ("setpriv (the drop) /bin/true", [*drop, "/bin/true"]),
        ("python3 -I -S -c pass (the loader's interpreter)", [seccomp.python(), "-I", "-S", "-c",
                                                              "pass"]),
        ("the C seccomp loader, then /bin/true", [*loader, "/bin/true"]),
        ("the Python seccomp loader, then /bin/true", [*py_loader, "/bin/true"]),
        ("sh -c 'exec /bin/true' (the front, the relay's shell)", ["/bin/sh", "-c",
                                                                   "exec /bin/true"]),
        ("env -i /bin/true (the relay's environment)", ["env", "-i", "/bin/true"]),
        ("venv python -c pass (the CLI's interpreter)", [venv, "-c", "pass"]),
        ("venv python -c 'import json, socket'", [venv, "-c", "import json, socket"]),
        ("codetainer --help (the sh front, then the Python CLI)",
         [str(VENV_BIN / "codetainer"), "--help"]),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for i in range(31):  # the first round warms the page cache
        for name, argv in rows:
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=False)
            if i:
                times[name].append((time.perf_counter() - t0) * 1000)
    print("\nthe attach path's links, each alone (process start to exit, median of 30):")
    for name, _ in rows:
        print(f"  {name:<52} {statistics.median(times[name]):6.1f} ms")
    import_rss()


#: what the daemon imports, roughly in its order (``codetainer.daemon`` last: the rest)
DAEMON_IMPORTS = ("structlog", "codetainer.settings", "codetainer.services.manager",
                  "codetainer.control.server", "codetainer.boot.privileges",
                  "codetainer.limits.controller", "codetainer.session.tmux",
                  "codetainer.network.controller", "codetainer.daemon",
                  # at first use: the agent's first process, the CoreDNS hook, the
                  # session's first sample
                  "pyseccomp", "codetainer.network.dnshook", "psutil")


def import_rss() -> None:
    """What the daemon keeps: the RSS each import adds (and the time it takes, the start-up
    before the boot's first step), one after the other, in one fresh
    interpreter of this checkout, in the daemon's order: first the init's lean imports
    (asyncio without ``ssl``, tenacity without tornado, hashlib without OpenSSL's), then the
    daemon's modules, then what is imported at first use. supervisor's parser runs in a
    forked child and is never kept."""
    code = ("import time\n"
            "def r():\n    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
            "def line(name, mib, ms):\n    print(f'  {name:<36} +{mib:4.1f} MiB {ms:6.1f} ms')\n"
            "prev = r()\nprint(f'  (interpreter) {prev:.1f} MiB')\nt = time.perf_counter()\n"
            "from codetainer.init.pid1 import _lean_imports\n_lean_imports()\n"
            "now = r(); tn = time.perf_counter()\n"
            "line('lean asyncio, tenacity, hashlib', now - prev, (tn - t) * 1000); prev, t = now, tn\n")
    for mod in DAEMON_IMPORTS:
        code += (f"import {mod}\nnow = r(); tn = time.perf_counter()\n"
                 f"line({mod!r}, now - prev, (tn - t) * 1000); prev, t = now, tn\n")
    # what the daemon leaves to children (the services parse, httpget's HTTPS): never kept
    for mod in ("ssl", "supervisor.options"):
        code += (f"import {mod}\nnow = r(); tn = time.perf_counter()\n"
                 f"line('({mod}: never kept)', now - prev, (tn - t) * 1000); prev, t = now, tn\n")
    r = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True,
                       check=False)
    print("\nwhat the daemon keeps: RSS (and start-up time) each import adds, in the daemon's "
          "order:")
    print(r.stdout.rstrip() or r.stderr[-500:])


# -- driver --------------------------------------------------------------------------------


def run_worker(kind: str, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--tree", str(tree),
            "-n", str(args.n), "--idle", str(args.idle), "--boots", str(args.boots)]
    # attach's worker runs in the tree; the others run this checkout's kit, which hands
    # PYTHONPATH to the tree's daemon and CLI
    env = {**os.environ, **(tree_env(tree) if kind == "attach" else {})}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"the {kind} worker for {tree} failed ({r.returncode}):\n"
                         f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def ms(values: list[float]) -> str:
    v = [x * 1000 for x in values]
    return f"median {statistics.median(v):6.1f} ms, p90 {pct(v, 90):6.1f} (n={len(v)})"


def report(names: list[str], acc: dict[str, dict[str, Any]], kinds: list[str]) -> None:
    print("\n== issue 10's fast paths, side by side ==")
    width = max(len(n) for n in names) + 2
    if "attach" in kinds:
        print("\n`codetainer attach`, session up, start to tmux attached "
              f"(target <= {ATTACH_TARGET_RATIO:g}x bare `tmux attach`):")
        for name in names:
            a = acc[name]["attach"]
            ours, bare = statistics.median(a["ours"]), statistics.median(a["bare"])
            print(f"  {name:<{width}} {ms(a['ours'])}; bare tmux {bare * 1000:.1f} ms; "
                  f"ratio {ours / bare:.1f}x; of it the `session` op (the daemon's live "
                  f"check, a tmux client through the chain) "
                  f"{statistics.median(a['session_op']) * 1000:.1f} ms")
    if "status" in kinds:
        print(f"\n`codetainer status`, start to exit (target median <= {STATUS_TARGET_MS:g} ms):")
        for name in names:
            print(f"  {name:<{width}} {ms(acc[name]['status'])}")
        print(f"\nidle RSS, init + daemon after boot (target <= {RSS_TARGET_MIB:g} MiB):")
        for name in names:
            rss, uss = acc[name]["rss"], acc[name]["uss"]
            mib = [statistics.median(r) / 2**20 for r in zip(*rss, strict=True)]
            umib = [statistics.median(u) / 2**20 for u in zip(*uss, strict=True)]
            print(f"  {name:<{width}} {mib[0]:.1f} + {mib[1]:.1f} = {sum(mib):.1f} MiB "
                  f"(unshared: {umib[0]:.1f} + {umib[1]:.1f} MiB)")
        for name in names:
            print(f"\n  {name}: `codetainer status` imports (python -X importtime, one run, ms):")
            for mod, t in acc[name]["importtime"]:
                print(f"    {t:7.1f}  {mod}")
            print(f"  {name}: extension modules the idle daemon keeps mapped: "
                  f"{', '.join(acc[name]['extensions'])}")
    if "boot" in kinds:
        print(f"\ndaemon boot, exec to READY over the socket, full boot in the sandbox "
              f"(target median <= {BOOT_TARGET_MS:g} ms):")
        for name in names:
            b = acc[name]
            print(f"  {name:<{width}} exec to READY {ms(b['wall'])}; the daemon's own boot "
                  f"median {statistics.median(b['boot']) * 1000:.0f} ms; init + daemon RSS at "
                  f"READY {statistics.median(b['rss_ready']) / 2**20:.1f} MiB")
        print("  median per step, ms:")
        steps = list(dict.fromkeys(s for name in names for s in acc[name]["steps"]))
        print("    " + " " * 20 + "".join(f"{name:>{width}}" for name in names))
        for step in steps:
            cells = "".join(
                f"{statistics.median(acc[name]['steps'][step]) * 1000:>{width}.1f}"
                if step in acc[name]["steps"] else f"{'-':>{width}}" for name in names)
            print(f"    {step:<20}{cells}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", metavar="TREE", action="append", default=[],
                    help="another checkout (git worktree add PATH REV); repeatable")
    ap.add_argument("--only", default=",".join(KINDS),
                    help="comma-separated subset of attach,status,boot (status includes RSS)")
    ap.add_argument("-n", type=int, default=10, help="attach/status samples per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree")
    ap.add_argument("--idle", type=float, default=20.0, help="idle window before RSS, seconds")
    ap.add_argument("--boots", type=int, default=3, help="full boots per round")
    ap.add_argument("--floor", action="store_true", help="also time the attach path's links")
    ap.add_argument("--worker", choices=("attach", "daemon", "boot"), help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_fastpaths: run as root (namespaces, setpriv, a daemon as PID 1)")
        return 2
    if args.worker:
        tree = Path(args.tree).resolve()
        if args.worker == "attach":
            out = work_attach(tree, args.n)
        elif args.worker == "daemon":
            out = work_daemon(tree, args.n, args.idle)
        else:
            out = work_boot(tree, args.boots)
        print(json.dumps(out))
        return 0
    trees = {"this checkout": ROOT}
    for b in args.baseline:
        path = Path(b).resolve()
        if not (path / "daemon" / "codetainer").is_dir():
            ap.error(f"{path} has no daemon/codetainer: give a checkout of this repository")
        trees[f"baseline {path.name}"] = path
    kinds = [k for k in args.only.split(",") if k]
    acc: dict[str, dict[str, Any]] = {name: {} for name in trees}
    for r in range(args.rounds):
        for name, tree in (list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]):
            print(f"-- round {r + 1}: {name} ({tree})", flush=True)
            a = acc[name]
            if "attach" in kinds:
                got = run_worker("attach", tree, args)
                for k in ("ours", "bare", "session_op"):
                    a.setdefault("attach", {}).setdefault(k, []).extend(got[k])
            if "status" in kinds:
                got = run_worker("daemon", tree, args)
                a.setdefault("status", []).extend(got["status"])
                a.setdefault("rss", []).append(got["rss"])
                a.setdefault("uss", []).append(got["uss"])
                a["importtime"], a["extensions"] = got["importtime"], got["extensions"]
            if "boot" in kinds:
                got = run_worker("boot", tree, args)
                a.setdefault("wall", []).extend(got["wall"])
                a.setdefault("boot", []).extend(got["boot"])
                a.setdefault("rss_ready", []).extend(got["rss_ready"])
                for step, vals in got["steps"].items():
                    a.setdefault("steps", {}).setdefault(step, []).extend(vals)
    report(list(trees), acc, kinds)
    if args.floor:
        floor()
    return 0


if __name__ == "__main__":
    sys.exit(main())
