"""The main job, locally: boot the whole codetainer in namespaces on this machine (no Docker).

``./dev sandbox`` (as root) builds, from real parts:

* a miniature Internet: a "world" network namespace with an upstream DNS server
  (dnsmasq, answering every name of ``network/domains.conf`` with documentation
  addresses) and TCP servers on those addresses, joined by a veth pair to
* the container: a scratch root filesystem (read-only binds of the system, the project
  and its venv) in fresh PID, mount, UTS and network namespaces, where ``codetainerd``
  runs as PID 1 and performs the full boot: secrets (stand-in values), tmpfs mounts,
  allowlist DNS (CoreDNS as in the image, built by ``./dev setup`` at the Dockerfile's
  pin; ``--dns-engine dnsmasq`` for the other engine) + default-deny firewall +
  self-test, git/gh/npm credentials, agent
  settings, read-only root, services, readiness, and the agent's tmux session with the
  real Claude Code CLI in it (``./dev setup`` installs it at the Dockerfile's pin),
  talking to a stand-in for Anthropic's API in the world (apistandin.py: canned
  replies, ``RUN: <command>`` asks for a Bash tool call) under its real host name,
  through the allowlist, the firewall and the policy proxy (``CODETAINER_PROXY=on`` as
  in the image); stand-ins for GitHub (git over HTTPS, the REST and GraphQL API: the
  machine clones ``REPO_URL=https://github.com/owner/repo.git`` from it), npm, PyPI and
  sentry.io answer under their real names too (standins.py);
  ``--agent-command`` overrides the agent.

``-e NAME=VALUE`` (repeatable) puts a variable in the daemon's environment, as ``fly
machine run -e`` does on Fly (``-e CODETAINER_DNS_ENGINE=dnsmasq``, ``-e FLY_MACHINE_ID=…``).

On a terminal it then runs ``codetainer attach`` inside, as ``fly ssh console`` would;
detach with ``C-b d``. Otherwise it prints the status. Ctrl-C (or ``codetainer
shutdown`` inside) stops the daemon; the namespaces are removed. The kit beside this
module (world, scratch root, full boot, stand-ins) is the one the integration tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` -> {NAME: VALUE}, the last one winning; ``ValueError`` says
    which pair is malformed and why."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _NAME.match(name):
            raise ValueError(f"-e {pair[:60]!r} is not NAME=VALUE (NAME: letters, digits and _, "
                             "not starting with a digit)")
        if "\0" in value:
            raise ValueError(f"-e {name}: the value has a NUL byte")
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dev sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/codetainer-sandbox", help="scratch directory")
    p.add_argument("--steps", default="", help="boot steps to run (default: all)")
    p.add_argument("--agent-command", default="",
                   help="command of the agent pane (default: the real Claude Code CLI, "
                   "talking to the test world's stand-in for Anthropic's API; a login "
                   "shell when ./dev setup has not installed the CLI)")
    p.add_argument("--no-attach", action="store_true", help="do not attach, just boot")
    p.add_argument("--dns-engine", choices=("coredns", "dnsmasq"),
                   default=os.environ.get("CODETAINER_DNS_ENGINE", "coredns"),
                   help="the DNS engine (default: $CODETAINER_DNS_ENGINE, else coredns as the image)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set NAME=VALUE in the daemon's environment, as `fly machine run -e` "
                   "does (repeatable; wins over the options above)")
    args = p.parse_args(argv)
    try:
        extra = parse_env(args.env)
    except ValueError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 64
    if os.geteuid() != 0:
        print("sandbox: run as root (it creates namespaces)", file=sys.stderr)
        return 64
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up (namespaces, processes) like Ctrl-C

    signal.signal(signal.SIGTERM, interrupt)
    from codetainer.sandbox.fullboot import proxy_boot
    from codetainer.sandbox.scratchroot import OUT
    from codetainer.sandbox.standins import StandIns

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    agent = args.agent_command or ("claude --dangerously-skip-permissions"
                                   if shutil.which("claude") else "bash -l")
    # NODE_EXTRA_CA_CERTS: the test CA for the agent itself when the proxy is off (-e
    # CODETAINER_PROXY=off); with it on, the agent trusts the proxy's CA instead
    env = {"CODETAINER_AGENT_COMMAND": agent, "CODETAINER_DNS_ENGINE": args.dns_engine,
           "NODE_EXTRA_CA_CERTS": StandIns.CA_INSIDE, **extra}
    if extra:  # names only: a value may be a secret
        print(f"sandbox: -e {', '.join(sorted(extra))}", flush=True)
    with proxy_boot(base, env=env, steps=args.steps) as (fb, _standins):
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
