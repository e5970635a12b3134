"""The main job, locally: boot the whole codetainer in namespaces on this machine (no Docker).

``./dev sandbox`` (as root) builds, from real parts:

* a miniature Internet: a "world" network namespace with an upstream DNS server
  (dnsmasq, answering every name of ``network/domains.conf`` with documentation
  addresses) and TCP servers on those addresses, joined by a veth pair to
* the container: a scratch root filesystem (read-only binds of the system, the project
  and its venv) in fresh PID, mount, UTS and network namespaces, where ``codetainerd``
  runs as PID 1 and performs the full boot: secrets (stand-in values), tmpfs mounts,
  allowlist DNS + default-deny firewall + self-test, git/gh/npm credentials, agent
  settings, read-only root, services, readiness, and the agent's tmux session (the agent
  command is a login shell unless ``--agent-command`` says otherwise: the Claude Code
  CLI is not installed here).

On a terminal it then runs ``codetainer attach`` inside, as ``fly ssh console`` would;
detach with ``C-b d``. Otherwise it prints the status. Ctrl-C (or ``codetainer
shutdown`` inside) stops the daemon; the namespaces are removed. Uses the helpers in
``tests/`` (the same world and scratch root the integration tests use).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dev sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/codetainer-sandbox", help="scratch directory")
    p.add_argument("--steps", default="", help="boot steps to run (default: all)")
    p.add_argument("--agent-command", default="bash -l", help="command of the agent pane")
    p.add_argument("--no-attach", action="store_true", help="do not attach, just boot")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("sandbox: run as root (it creates namespaces)", file=sys.stderr)
        return 64
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up (namespaces, processes) like Ctrl-C

    signal.signal(signal.SIGTERM, interrupt)
    sys.path.insert(0, str(ROOT))
    from tests.fullboot import full_boot
    from tests.scratchroot import OUT

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    os.chmod(base, 0o755)  # noqa: S103 - the scratch root's binds must be reachable
    env = {"CODETAINER_AGENT_COMMAND": args.agent_command}
    with full_boot(env=env, steps=args.steps, base=base) as fb:
        codetainer = str(Path(sys.executable).parent / "codetainer")
        print(f"sandbox: codetainerd is PID 1 (host pid {fb.proc.pid}); log {fb.log_path}\n"
              f"sandbox: from the host: {codetainer} --socket {fb.socket} status", flush=True)
        try:
            if sys.stdin.isatty() and not args.no_attach:
                subprocess.run(fb.nsenter_argv(
                    "codetainer", "attach",
                    env={"TERM": os.environ.get("TERM", "xterm-256color"),
                         "CODETAINER_SOCKET": f"{OUT}/control.sock"}), check=False)
            else:
                with contextlib.suppress(AssertionError):
                    fb.wait_boot(120)
                subprocess.run([codetainer, "--socket", fb.socket, "status"], check=False)
                print("sandbox: Ctrl-C stops it", flush=True)
                while fb.proc.popen.poll() is None:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            code = int(fb.stop())
    print(f"sandbox: codetainerd exited {code}", flush=True)
    return code

if __name__ == "__main__":
    sys.exit(main())
