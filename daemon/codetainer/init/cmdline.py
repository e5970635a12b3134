"""codetainerd's command line and settings, read once, before the daemon's heavy imports
(the entrypoint starts the services file's parse from them while those imports run)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import NoReturn

from codetainer.errors import ExitCode
from codetainer.settings import Settings


class _Parser(argparse.ArgumentParser):
    """A bad command line exits 64 (README: exit codes), not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(
        prog="codetainerd",
        description="codetainer init daemon (container entrypoint). "
        "Settings are CODETAINER_* environment variables; see README.md.",
    )
    p.add_argument("--services", help="supervisord-format services file")
    p.add_argument("--socket", help="control socket path (also CODETAINER_SOCKET)")
    p.add_argument("--steps", help="comma-separated boot steps to run (default: all)")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Command:
    settings: Settings
    #: the boot steps to run (``--steps``), None: all
    steps: list[str] | None


def read_command(argv: list[str]) -> Command:
    """The command line and the settings; a bad one of either exits 64 (SystemExit) with
    one line naming what is wrong, ``--help`` exits 0."""
    args = parse_args(argv)
    try:
        settings = Settings.from_env(socket=args.socket or "", services=args.services or "")
    except ValueError as exc:  # SettingsError: the variable, its value, what is accepted
        print(f"codetainerd: {exc}", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE) from None
    steps = [n.strip() for n in args.steps.split(",") if n.strip()] if args.steps else None
    return Command(settings, steps)
