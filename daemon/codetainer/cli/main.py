"""``codetainer``: the command-line client of codetainerd.

Start-up is kept fast: only the standard library and the small control client are
imported before the command runs; renderers are imported by the commands that use them.

Exit codes of ``codetainer status`` (documented in README.md):
0 READY, 1 DEGRADED, 2 FAILED, 3 BOOTING or STOPPING, 4 the daemon cannot be reached.
Other commands: 0 success, 1 the daemon refused or failed the request, 4 unreachable,
64 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from codetainer.cli.inert import inert, inert_text
from codetainer.control.client import Client, DaemonUnreachable, RequestFailed

EXIT_UNREACHABLE = 4
EXIT_FAILED = 1
EXIT_USAGE = 64
STATE_EXIT = {"READY": 0, "DEGRADED": 1, "FAILED": 2, "BOOTING": 3, "STOPPING": 3, "STOPPED": 3}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors exiting 64 as README says (its own 2 is FAILED's code)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="codetainer", description="Control and inspect codetainerd.")
    p.add_argument("--socket", help="control socket (default $CODETAINER_SOCKET or "
                   "/run/codetainer/control.sock)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    st = sub.add_parser("status", help="show boot, services, network and session state")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--check", action="store_true",
                    help="health check: one line, exit 0 if READY or DEGRADED, else 1")
    st.add_argument("--tail", action="store_true", help="include services' last output lines")
    ev = sub.add_parser("events", help="stream daemon events (JSON lines)")
    ev.add_argument("--replay", action="store_true", help="start with recent history")
    sub.add_parser("wait", help="wait until boot finishes; exit code as status")
    for name in ("start", "stop", "restart"):
        sp = sub.add_parser(name, help=f"{name} a service (root only)")
        sp.add_argument("name")
    sub.add_parser("reload", help="re-read services and network policy (root only)")
    sub.add_parser("shutdown", help="stop the agent, the services and the daemon (root only)")
    sub.add_parser("attach", help="attach to the agent's tmux session (boot progress first)")
    why = sub.add_parser("why", help="is HOST or IP allowed, and was it denied?")
    why.add_argument("target")
    allow = sub.add_parser("allow", help="allow NAME temporarily (root only)")
    allow.add_argument("target")
    allow.add_argument("--for", dest="duration", default="1h",
                       help="how long, e.g. 30m, 2h (default 1h)")
    return p


def _err(msg: str) -> None:
    print(f"codetainer: {msg}", file=sys.stderr)


def _unreachable(exc: DaemonUnreachable) -> int:
    _err(f"{exc}. Is codetainerd running? Set --socket or CODETAINER_SOCKET if it listens "
         "elsewhere.")
    return EXIT_UNREACHABLE


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket) as c:
            st: dict[str, Any] = c.call("status", tail=bool(args.tail))
        if not args.json:
            st = inert(st)  # agent-chosen names and command lines reach root's terminal
    except DaemonUnreachable as exc:
        if args.json:
            print(json.dumps({"state": "UNREACHABLE", "error": str(exc)}))
        if args.check:
            print(f"UNHEALTHY: {exc}")
            return 1
        return _unreachable(exc)
    state = str(st.get("state"))
    if args.check:
        ok = state in ("READY", "DEGRADED")
        reasons = "; ".join(st.get("reasons") or [])
        print(f"{'HEALTHY' if ok else 'UNHEALTHY'}: {state}" + (f" ({reasons})" if reasons else ""))
        return 0 if ok else 1
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        from codetainer.cli.render import render_status

        print(render_status(st, color=sys.stdout.isatty()))
    return STATE_EXIT.get(state, 2)


def cmd_events(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, timeout=None) as c:
            for ev in c.stream("events", replay=bool(args.replay)):
                if "__result__" not in ev:
                    print(json.dumps(ev), flush=True)
    except DaemonUnreachable as exc:
        return _unreachable(exc)
    except RequestFailed as exc:
        _err(exc.message)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from codetainer.cli.render import step_line

    result: dict[str, Any] = {}
    try:
        with Client(args.socket, timeout=None) as c:
            for ev in c.stream("wait"):
                if "__result__" in ev:
                    result = ev["__result__"]
                elif ev.get("event") == "boot.step" and ev.get("state") != "PENDING":
                    print(step_line(inert(ev), color=sys.stdout.isatty()), flush=True)
    except DaemonUnreachable as exc:
        return _unreachable(exc)
    except KeyboardInterrupt:
        return 130
    result = inert(result)
    state = str(result.get("state"))
    print(f"boot: {state}")
    for reason in result.get("reasons") or []:
        print(f"  {reason}")
    return STATE_EXIT.get(state, 2)


def cmd_simple(args: argparse.Namespace, op: str, **kw: Any) -> int:
    try:
        with Client(args.socket, timeout=60) as c:
            result = c.call(op, **kw)
    except DaemonUnreachable as exc:
        return _unreachable(exc)
    except RequestFailed as exc:
        _err(exc.message)
        return EXIT_FAILED
    if isinstance(result, dict) and "text" in result:
        print(inert_text(str(result["text"])))
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd is None:
        p.print_help()
        return EXIT_USAGE
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "events":
        return cmd_events(args)
    if args.cmd == "wait":
        return cmd_wait(args)
    if args.cmd in ("start", "stop", "restart"):
        return cmd_simple(args, args.cmd, name=args.name)
    if args.cmd in ("reload", "shutdown"):
        return cmd_simple(args, args.cmd)
    if args.cmd == "why":
        return cmd_simple(args, "why", target=args.target)
    if args.cmd == "allow":
        return cmd_simple(args, "allow", target=args.target, duration=args.duration)
    if args.cmd == "attach":
        return attach_main([], args.socket)
    return EXIT_USAGE


def status_main() -> int:
    """The compatibility name ``status``: ``codetainer status``."""
    return main(["status", *sys.argv[1:]])


def attach_main(argv: list[str] | None = None, socket: str | None = None) -> int:
    from codetainer.cli import attach

    return attach.run(sys.argv[1:] if argv is None else argv, socket)


if __name__ == "__main__":
    sys.exit(main())
