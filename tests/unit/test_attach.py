"""attach: rendering, argument parsing and the decision flow, with exec behind a seam."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
from codetainer.cli import attach, render
from codetainer.control.server import ControlServer, Request, Send


class Exec(Exception):
    def __init__(self, kind: str, info: dict[str, Any] | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.info = info


@pytest.fixture
def seams(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_tmux(info: dict[str, Any]) -> NoReturn:
        raise Exec("tmux", info)

    def fake_shell() -> NoReturn:
        raise Exec("shell")

    monkeypatch.setattr(attach, "exec_tmux", fake_tmux)
    monkeypatch.setattr(attach, "exec_shell", fake_shell)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)


def test_tmux_argv_attaches_by_id_and_selects_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODETAINER_TMUX", raising=False)
    argv = attach.tmux_attach_argv({"socket": "/s", "id": "$0", "agent_pane": "%3"})
    assert argv == ["tmux", "-u", "-S", "/s", "attach-session", "-t", "$0", ";",
                    "select-pane", "-t", "%3"]
    assert attach.tmux_attach_argv({"socket": "/s", "id": "$1"})[-1] == "$1"


@pytest.mark.parametrize(("ev", "expected"), [
    ({"name": "net", "state": "RUNNING"}, "[ .. ] net"),
    ({"name": "net", "state": "OK", "duration_s": 0.4213, "reason": "ok"}, "[ OK ] net 0.42s  ok"),
    ({"name": "net", "state": "FAILED", "duration_s": 1, "reason": "r", "hint": "h"},
     "[FAIL] net 1.00s  r\n       fix: h"),
    ({"name": "p", "state": "DEGRADED", "duration_s": 2, "reason": "r"}, "[WARN] p 2.00s  r"),
    ({"name": "s", "state": "SKIPPED", "duration_s": 0, "reason": "skipped"}, "[SKIP] s  skipped"),
])
def test_progress_line(ev: dict[str, Any], expected: str) -> None:
    assert render.progress_line(ev) == expected


def test_plain_progress_prints_start_and_end_once() -> None:
    out = io.StringIO()
    p = attach.Progress(out, spinner=False)
    p.step({"name": "clone", "state": "RUNNING"})
    p.step({"name": "clone", "state": "RUNNING"})  # replayed
    p.step({"name": "clone", "state": "OK", "duration_s": 1.5})
    p.step({"name": "clone", "state": "OK", "duration_s": 1.5})  # replayed
    p.close()
    assert out.getvalue() == "[ .. ] clone\n[ OK ] clone 1.50s\n"


def test_spinner_progress_redraws_one_line() -> None:
    out = io.StringIO()
    p = attach.Progress(out, spinner=True)
    p.step({"name": "clone", "state": "RUNNING"})
    import time
    time.sleep(0.35)
    p.step({"name": "clone", "state": "OK", "duration_s": 0.3})
    p.close()
    text = out.getvalue()
    assert "\r\x1b[K" in text and "clone 0." in text
    assert text.rstrip("\r\x1b[K").endswith("[ OK ] clone 0.30s\n")


def test_render_brief() -> None:
    """What attach prints without a terminal (the renderer of ``codetainer status``'s
    module: attach has none of its own)."""
    text = render.render_brief(
        {"state": "READY", "steps": [{"name": "net", "state": "OK", "duration_s": 0.1}],
         "session": {"exists": True, "id": "$0", "name": "claude", "socket": "/s"}}, None)
    assert text.splitlines()[0] == "boot: READY"
    assert "[ OK ] net 0.10s" in text and "session: $0 (claude) on /s" in text
    assert render.render_brief(None, {"exists": False, "reason": "boot FAILED"}) == (
        "session: not running (boot FAILED)")


def test_parse_args() -> None:
    assert attach._parse([]) is None
    assert attach._parse(["--socket", "/x"]) == "/x"
    assert attach._parse(["--socket=/y"]) == "/y"
    with pytest.raises(SystemExit):
        attach._parse(["--bogus"])


def test_unreachable_without_tty_returns_69(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert attach.run([], str(tmp_path / "none.sock")) == attach.UNREACHABLE
    assert "cannot reach codetainerd" in capsys.readouterr().out


def test_unreachable_with_tty_opens_shell(tmp_path: Path, seams: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exec) as exc:
        attach.run(["--socket", str(tmp_path / "none.sock")], None)
    assert exc.value.kind == "shell"
    assert "no socket there" in capsys.readouterr().out


async def _serve(tmp_path: Path, handlers: dict[str, Any],
                 streams: dict[str, Any]) -> ControlServer:
    server = ControlServer(str(tmp_path / "ctl.sock"))
    for op, h in handlers.items():
        server.register(op, h)
    for op, h in streams.items():
        server.register_stream(op, h)
    await server.start()
    return server


async def _run_attach(path: str) -> Exec:
    def go() -> Exec:
        try:
            attach.run([], path)
        except Exec as e:
            return e
        raise AssertionError("attach returned instead of exec'ing")
    return await asyncio.to_thread(go)


async def test_session_up_execs_tmux(tmp_path: Path, seams: None) -> None:
    info = {"exists": True, "socket": "/s", "id": "$0", "agent_pane": "%0", "state": "RUNNING"}

    async def session(req: Request) -> dict[str, Any]:
        return info

    server = await _serve(tmp_path, {"session": session}, {})
    try:
        result = await _run_attach(server.path)
    finally:
        await server.close()
    assert result.kind == "tmux" and result.info == info


async def test_boot_then_session_ready_execs_tmux(tmp_path: Path, seams: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    async def session(req: Request) -> dict[str, Any]:
        return {"exists": False, "state": "STOPPED"}

    async def wait(req: Request, send: Send) -> dict[str, Any]:
        await send({"event": "boot.step", "name": "net", "state": "OK", "duration_s": 0.2})
        await send({"event": "session.ready", "exists": True, "socket": "/s", "id": "$2",
                    "agent_pane": "%4"})
        return {"state": "READY", "reasons": []}

    server = await _serve(tmp_path, {"session": session}, {"wait": wait})
    try:
        result = await _run_attach(server.path)
    finally:
        await server.close()
    assert result.kind == "tmux" and result.info is not None and result.info["id"] == "$2"
    assert "[ OK ] net 0.20s" in capsys.readouterr().out


async def test_failed_boot_prints_reasons_then_shell(tmp_path: Path, seams: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    async def session(req: Request) -> dict[str, Any]:
        return {"exists": False, "state": "STOPPED"}

    async def wait(req: Request, send: Send) -> dict[str, Any]:
        return {"state": "FAILED", "reasons": ["network: no nft (install nftables)"]}

    server = await _serve(tmp_path, {"session": session}, {"wait": wait})
    try:
        result = await _run_attach(server.path)
    finally:
        await server.close()
    out = capsys.readouterr().out
    assert result.kind == "shell"
    assert "boot FAILED" in out and "network: no nft (install nftables)" in out
    assert out.index("network: no nft") < out.index("opening a shell")


async def test_session_failed_state_goes_to_shell(tmp_path: Path, seams: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    async def session(req: Request) -> dict[str, Any]:
        return {"exists": False, "state": "FAILED", "reason": "tmux missing", "hint": "apt"}

    server = await _serve(tmp_path, {"session": session}, {})
    try:
        result = await _run_attach(server.path)
    finally:
        await server.close()
    assert result.kind == "shell"
    assert "tmux missing (fix: apt)" in capsys.readouterr().out


def test_known_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TERMINFO", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "my-term").write_bytes(b"x")
    assert attach._known_terminal("my-term")
    assert not attach._known_terminal("no-such-terminal-xyz")
    assert not attach._known_terminal("")
    assert not attach._known_terminal("../etc/passwd")
