"""``codetainer``: the command-line client of codetainerd.

Start-up is kept fast (it is most of what ``status`` and ``attach`` cost,
bench/bench_fastpaths.py): only the small control client (``json``, ``socket``) is
imported before the command runs; renderers are imported by the commands that use them;
``typing`` is never imported at run time; and ``status`` with its switches and ``attach``
are parsed without argparse (:func:`fast_parse`), whose import and parser cost a third of
a ``status``. Anything else, help and usage errors included, goes through argparse.

Exit codes of ``codetainer status`` (documented in README.md):
0 READY, 1 DEGRADED, 2 FAILED, 3 BOOTING or STOPPING, 4 the daemon cannot be reached.
Other commands: 0 success, 1 the daemon refused or failed the request, 4 unreachable,
64 usage error.
"""

from __future__ import annotations

import json
import sys

from codetainer.cli.inert import inert
from codetainer.control.client import Client, DaemonUnreachable, RequestFailed

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

    from codetainer.status import StatusReply

EXIT_UNREACHABLE = 4
EXIT_FAILED = 1
EXIT_USAGE = 64
STATE_EXIT = {"READY": 0, "DEGRADED": 1, "FAILED": 2, "BOOTING": 3, "STOPPING": 3, "STOPPED": 3}
#: the switches of ``status`` (each store_true in the parser), as fast_parse knows them
STATUS_SWITCHES = ("--json", "--check", "--tail")


def _parser() -> argparse.ArgumentParser:
    import argparse

    class _Parser(argparse.ArgumentParser):
        """argparse, with usage errors exiting 64 as README says (its own 2 is FAILED's)."""

        def error(self, message: str) -> NoReturn:
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

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
    why = sub.add_parser("why", help="is HOST, IP or URL allowed, and was it denied or refused?")
    why.add_argument("target", help="a host name, an IP, or a URL (https://host/path)")
    why.add_argument("--method", "-X", default="",
                     help="for a URL: the HTTP method to decide (default: GET and POST)")
    allow = sub.add_parser("allow", help="allow NAME temporarily (root only)")
    allow.add_argument("target", nargs="+",
                       help="an allowlist entry with optional rules, as in domains.conf: "
                       "api.github.com methods=POST paths=/gists")
    allow.add_argument("--for", dest="duration", default="1h",
                       help="how long, e.g. 30m, 2h (default 1h)")
    return p


def _err(msg: str) -> None:
    print(f"codetainer: {msg}", file=sys.stderr)


def _unreachable(exc: DaemonUnreachable) -> int:
    _err(f"{exc}. Is codetainerd running? Set --socket or CODETAINER_SOCKET if it listens "
         "elsewhere.")
    return EXIT_UNREACHABLE


def fast_parse(argv: list[str]) -> tuple[str | None, str, frozenset[str]] | None:
    """``(socket, command, switches)`` of ``[--socket PATH] status [SWITCH...]`` or
    ``[--socket PATH] attach``, exactly as the parser reads them; ``None`` for anything
    else (the parser takes it: other commands, help, abbreviations, mistakes)."""
    rest = list(argv)
    socket = None
    if rest and rest[0].startswith("--socket="):
        socket = rest.pop(0).partition("=")[2]
    elif len(rest) >= 2 and rest[0] == "--socket" and not rest[1].startswith("-"):
        socket, rest = rest[1], rest[2:]
    if not rest:
        return None
    cmd, switches = rest[0], rest[1:]
    if (cmd == "attach" and not switches) or \
            (cmd == "status" and all(s in STATUS_SWITCHES for s in switches)):
        return socket, cmd, frozenset(switches)
    return None


def cmd_status(socket: str | None, *, json_out: bool = False, check: bool = False,
               tail: bool = False) -> int:
    try:
        with Client(socket) as c:
            # --check (the HEALTHCHECK) asks for the state and reasons only: as cheap as ping
            st: StatusReply = (c.call("status", brief=True) if check
                                  else c.call("status", tail=tail))
        if not json_out:
            st = inert(st)  # agent-chosen names and command lines reach root's terminal
    except DaemonUnreachable as exc:
        if json_out:
            print(json.dumps({"state": "UNREACHABLE", "error": str(exc)}))
        if check:
            print(f"UNHEALTHY: {exc}")
            return 1
        return _unreachable(exc)
    state = str(st.get("state"))
    if check:
        ok = state in ("READY", "DEGRADED")
        reasons = "; ".join(st.get("reasons") or [])
        print(f"{'HEALTHY' if ok else 'UNHEALTHY'}: {state}" + (f" ({reasons})" if reasons else ""))
        return 0 if ok else 1
    if json_out:
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
    if op == "why" and isinstance(result, dict):
        from codetainer.cli.render import render_why

        print(render_why(inert(result)))
    elif op == "allow" and isinstance(result, dict) and "grant" in result:
        from codetainer.cli.render import render_allow

        print(render_allow(inert(result)))
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fast = fast_parse(argv)
    if fast is not None:
        socket, cmd, switches = fast
        if cmd == "attach":
            return attach_main([], socket)
        return cmd_status(socket, json_out="--json" in switches, check="--check" in switches,
                          tail="--tail" in switches)
    p = _parser()
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return EXIT_USAGE
    if args.cmd == "status":
        return cmd_status(args.socket, json_out=args.json, check=args.check, tail=args.tail)
    if args.cmd == "events":
        return cmd_events(args)
    if args.cmd == "wait":
        return cmd_wait(args)
    if args.cmd in ("start", "stop", "restart"):
        return cmd_simple(args, args.cmd, name=args.name)
    if args.cmd in ("reload", "shutdown"):
        return cmd_simple(args, args.cmd)
    if args.cmd == "why":
        if args.method:
            return cmd_simple(args, "why", target=args.target, method=args.method.upper())
        return cmd_simple(args, "why", target=args.target)
    if args.cmd == "allow":
        return cmd_simple(args, "allow", target=" ".join(args.target), duration=args.duration)
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
