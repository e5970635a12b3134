"""The CLI's fast paths (issue 10): what ``status`` and ``attach`` import, the parse that
skips argparse, and the seccomp filter the daemon hands to ``attach`` (rendering and
checks only; the chain runs for real in tests/integration/test_chain.py)."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
from typing import Any

import pytest
from codetainer.boot import chain, seccomp
from codetainer.boot.privileges import AgentUser, ExecLimits, setpriv_argv
from codetainer.cli import attach
from codetainer.cli import main as cli_main

from tests.unit.test_session_manager import FakeManager

INFO = {"socket": "/run/codetainer/tmux/agent.sock", "id": "$0", "agent_pane": "%0",
        "user": "claude", "uid": 1000, "gid": 1000, "home": "/home/claude",
        "limits": ExecLimits(1000, 10, 300, ("/cg/agent/cgroup.procs",)).as_dict()}
#: what neither path may import: each costs milliseconds of every ``status``/``attach``
HEAVY = ("typing", "argparse", "shutil", "dataclasses", "threading", "pyseccomp", "ctypes",
         "codetainer.boot.privileges", "codetainer.boot.seccomp")


def imported_by(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       check=True, timeout=60)
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_status_imports_nothing_heavy() -> None:
    mods = imported_by("from codetainer.cli.main import main, fast_parse\n"
                       "import codetainer.cli.render\n"
                       "assert fast_parse(['status', '--json']) is not None")
    assert not mods & set(HEAVY), mods & set(HEAVY)
    assert "codetainer.control.client" in mods  # the probe did import the client


def test_attach_renders_the_chain_without_the_daemons_helpers() -> None:
    info = {**INFO, "seccomp_filter": seccomp.filter_hex()}
    mods = imported_by("from codetainer.cli.main import main\n"
                       "from codetainer.cli import attach\n"
                       f"argv, env = attach.dropped_attach({info!r}, {{'PATH': '/bin'}})\n"
                       "assert any('--reuid=1000' in a for a in argv)")
    assert not mods & set(HEAVY), mods & set(HEAVY)
    assert "codetainer.boot.chain" in mods


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json"], ["status", "--check"], ["status", "--tail", "--json"],
    ["--socket", "/s", "status"], ["--socket=/s", "status", "--check"], ["--socket=", "status"],
    ["attach"], ["--socket", "/s", "attach"], ["--socket", "attach", "attach"],
])
def test_fast_parse_reads_what_the_parser_reads(argv: list[str]) -> None:
    fast = cli_main.fast_parse(argv)
    assert fast is not None
    args = cli_main._parser().parse_args(argv)
    socket, cmd, switches = fast
    assert (socket, cmd) == (args.socket, args.cmd)
    if cmd == "status":
        assert switches == {f"--{k}" for k in ("json", "check", "tail") if getattr(args, k)}


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["status", "-h"], ["status", "--js"], ["--sock", "/s", "status"],
    ["--socket", "--json", "status"], ["status", "extra"], ["attach", "--check"],
    ["status", "--socket", "/s"], ["events"], ["why", "example.com"], ["--socket", "/s"],
])
def test_everything_else_goes_to_the_parser(argv: list[str]) -> None:
    assert cli_main.fast_parse(argv) is None


class FakeClient:
    asked: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, path: str | None = None, timeout: float | None = 5.0) -> None:
        self.path = path

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        FakeClient.asked.append((op, {"path": self.path, **args}))
        return {"state": "DEGRADED", "reasons": ["r"]}


@pytest.mark.parametrize(("argv", "asked", "code"), [
    (["--socket", "/s", "status", "--check"], ("status", {"path": "/s", "brief": True}), 0),
    (["status", "--tail", "--json"], ("status", {"path": None, "tail": True}), 1),
    (["--sock", "/s", "status"], ("status", {"path": "/s", "tail": False}), 1),  # argparse's
])
def test_both_ways_run_the_same_command(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                        asked: tuple[str, dict[str, Any]], code: int,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_main, "Client", FakeClient)
    FakeClient.asked = []
    assert cli_main.main(argv) == code
    assert FakeClient.asked == [asked]
    capsys.readouterr()


# -- the filter the daemon hands to attach --------------------------------------------------

def test_the_session_reply_carries_the_filter_only_when_the_session_is_up() -> None:
    class Up(FakeManager):
        def _server_gone(self) -> str | None:
            return None  # its (fake) server runs

        async def _tmux(self, *args: str) -> str:
            return "$0\tclaude\n" if args[0] == "display-message" else await super()._tmux(*args)

    m = Up()
    down = asyncio.run(m.session_handler(None))
    assert down["exists"] is False and "seccomp_filter" not in down
    asyncio.run(m.start())
    up = asyncio.run(m.session_handler(None))
    assert up["exists"] is True and up["seccomp_filter"] == seccomp.filter_hex()
    assert "seccomp_filter" not in m.describe()  # not in status or session.ready


def test_the_session_reply_reads_the_servers_process_not_tmux() -> None:
    """A server that exited is not reported up, told from the kernel: no tmux client."""
    m = FakeManager()
    asyncio.run(m.start())
    assert m.server_pid == 41  # the fake's: no process of the agent's has it here
    reply = asyncio.run(m.session_handler(None))
    assert reply["exists"] is False and "pid 41) exited" in reply["reason"], reply
    assert "seccomp_filter" not in reply
    assert not any(c[0] == "display-message" for c in m.calls)


def test_attach_loads_the_filter_the_daemon_handed() -> None:
    handed = seccomp.compile_filter(seccomp.RULES[:1]).hex()  # a different, valid program
    argv, _env = attach.dropped_attach({**INFO, "seccomp_filter": handed}, {"PATH": "/bin"})
    inner = argv[argv.index(attach.SCRIPT):][5]
    assert inner.startswith("set -- ") and f" {handed} --nproc=300 --core=0 --nice=10 -- " in inner
    # without one (a session.ready event, an older daemon) it compiles the filter itself
    argv, _env = attach.dropped_attach(INFO, {"PATH": "/bin"})
    assert f" {seccomp.filter_hex()} --nproc=300" in argv[argv.index(attach.SCRIPT):][5]


@pytest.mark.parametrize("bad", ["", "00" * 7, "zz" * 8, "AB" * 8, "00" * (8 * 4096 + 8), 42,
                                 ["00" * 8]])
def test_a_malformed_filter_refuses_the_attach(bad: object) -> None:
    with pytest.raises(ValueError):
        chain.checked_filter(bad)
    with pytest.raises(attach.UnsafeAttach):
        attach.dropped_attach({**INFO, "seccomp_filter": bad}, {"PATH": "/bin"})


def test_attach_and_the_daemon_render_one_chain() -> None:
    """The client's chain is the daemon's, link for link (boot/chain.py renders both)."""
    argv, _env = attach.dropped_attach({**INFO, "seccomp_filter": seccomp.filter_hex()},
                                       {"PATH": "/bin"})
    inner = argv[argv.index(attach.SCRIPT):][5]  # run by script's shell: `set -- ARGS; JOIN`
    daemon = setpriv_argv(AgentUser("claude", 1000, 1000, "/home/claude"),
                          attach.tmux_attach_argv(INFO), ExecLimits.from_dict(INFO["limits"]))
    assert daemon[:4] == ["/bin/sh", "-c", chain.JOIN, chain.JOIN_NAME]
    assert inner.startswith("set -- ") and inner.endswith(f"; {chain.JOIN}")
    assert shlex.split(inner.removeprefix("set -- ").removesuffix(f"; {chain.JOIN}")) == daemon[4:]
