"""The main job, locally: boot codetainerd as PID 1 in fresh namespaces (no Docker).

``./dev sandbox`` runs this as root. codetainerd gets its own PID, mount, UTS and network
namespaces (PID 1 inside), the repository's services file, and a control socket in a
scratch directory, so from another terminal::

    codetainer --socket /tmp/codetainer-sandbox/control.sock status

Ctrl-C (or ``codetainer ... shutdown``) stops it cleanly; the exit code is the daemon's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dev sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/codetainer-sandbox", help="scratch directory")
    p.add_argument("--steps", default="", help="boot steps to run (default: all that apply)")
    args, rest = p.parse_known_args(argv)
    if os.geteuid() != 0:
        print("sandbox: run as root (it creates namespaces)", file=sys.stderr)
        return 64
    scratch = Path(args.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    os.chmod(scratch, 0o755)  # noqa: S103 - the socket dir must be reachable by any uid
    sock = scratch / "control.sock"
    codetainerd = str(Path(sys.executable).parent / "codetainerd")
    argv_d = [codetainerd, "--socket", str(sock), *rest]
    if args.steps:
        argv_d += ["--steps", args.steps]
    env = dict(os.environ)
    env.update({"CODETAINER_RUN_DIR": str(scratch / "run"), "CODETAINER_LOG_FORMAT": "console"})
    print(f"sandbox: codetainerd as PID 1; socket {sock}\n"
          f"sandbox: in another terminal: {Path(sys.executable).parent}/codetainer "
          f"--socket {sock} status\nsandbox: Ctrl-C stops it\n", flush=True)
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--uts", "--net",
           "--kill-child", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh", *argv_d]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal's ^C reached the daemon's init too (same foreground group).
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
