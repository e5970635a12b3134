"""The CLI at the boundary: agent-chosen text made inert, root attach dropped, usage exits."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import Any

import pytest
from codetainer.cli import main as cli_main
from codetainer.cli.attach import UnsafeAttach, dropped_attach
from codetainer.cli.inert import inert, inert_text
from codetainer.cli.render import render_brief

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"


def test_control_characters_become_visible_escapes() -> None:
    assert inert_text(f"name{OSC52}") == "name\\x1b]52;c;ZWNobyBwd25lZA==\\x07"
    assert inert_text("a\tb\nc") == "a\tb\nc"
    assert inert_text("\x9b31m") == "\\x9b31m"  # C1 CSI
    assert inert({"k\x1b": ["v\x07", 3, None]}) == {"k\\x1b": ["v\\x07", 3, None]}


def test_attach_status_render_is_inert() -> None:
    session = {"exists": True, "id": "$0", "name": f"renamed{OSC52}", "socket": "/s"}
    out = render_brief(None, inert(session))
    assert "\x1b" not in out and "\x07" not in out and "renamed\\x1b" in out


class FakeClient:
    reply: Any = None

    def __init__(self, *a: Any, **kw: Any) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def call(self, op: str, **kw: Any) -> Any:
        return self.reply


@pytest.mark.parametrize("argv", [["status"], ["why", "x"]])
def test_cli_prints_agent_text_inert(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    FakeClient.reply = {"state": "READY", "steps": [], "reasons": [f"bad{OSC52}"],
                        "target": f"x{OSC52}", "kind": "host", "verdict": f"refused {OSC52}",
                        "notes": [f"refused {OSC52}"],
                        "session": {"exists": True, "name": f"x{OSC52}", "panes": []}}
    monkeypatch.setattr(cli_main, "Client", FakeClient)
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli_main.main(argv)
    assert "\x1b]52" not in buf.getvalue() and "\x07" not in buf.getvalue()


def test_status_json_escapes_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.reply = {"state": "READY", "name": f"x{OSC52}"}
    monkeypatch.setattr(cli_main, "Client", FakeClient)
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli_main.main(["status", "--json"])
    assert "\x1b" not in buf.getvalue()
    assert json.loads(buf.getvalue())["name"] == f"x{OSC52}"


def test_root_attach_runs_the_client_as_the_agent_on_a_relay_pty() -> None:
    info = {"socket": "/run/codetainer/tmux/agent.sock", "id": "$0", "agent_pane": "%0",
            "user": "claude", "uid": 1000, "gid": 1000, "home": "/home/claude"}
    environ = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "GH_PAT": "ghp_x", "PATH": "/bin",
               "SSH_AUTH_SOCK": "/tmp/agent", "SHELL": "/bin/bash"}
    argv, env = dropped_attach(info, environ)
    assert env == environ  # root's own, for the shell after a detach
    relay = argv[argv.index("/usr/bin/script"):]
    assert relay[-1] == "/dev/null"
    inner = relay[relay.index("-c") + 1]
    for part in ("--reuid=1000", "--regid=1000", "--clear-groups", "--no-new-privs",
                 "--bounding-set=-all", "attach-session -t '$0'"):
        assert part in inner
    # what the relay and the client get: `env -i` and only these
    client_env = argv[4:argv.index("/usr/bin/script")]
    assert client_env == ["TERM=xterm-256color", "LANG=C.UTF-8", "PATH=/bin", "SHELL=/bin/sh",
                          "HOME=/home/claude"]
    assert argv[:2] == ["/bin/sh", "-c"] and 'env -i "$@"' in argv[2] and argv[3] == "/bin/bash"


@pytest.mark.parametrize("uid", [None, 0, "1000"])
def test_root_attach_refuses_without_a_real_agent_uid(uid: Any) -> None:
    with pytest.raises(UnsafeAttach):
        dropped_attach({"socket": "/s", "id": "$0", "uid": uid, "gid": 1000}, {})


@pytest.mark.parametrize("argv", [["nosuchcommand"], ["status", "--bogus"], ["why"],
                                  ["allow"]])
def test_cli_usage_errors_exit_64_not_failed_status(argv: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """2 is `status`'s FAILED; a usage error is 64 (README's exit code table)."""
    with pytest.raises(SystemExit) as exc:
        cli_main.main(argv)
    assert exc.value.code == 64
    assert "usage: codetainer" in capsys.readouterr().err
