"""The Claude Code hooks in hooks/: session namer (Stop hook) and status line.

The hooks run as stand-alone scripts, so most tests run them the way Claude Code does:
a subprocess with the hook input on stdin. The namer is tested against a stand-in
``claude`` executable and a real tmux server on a socket of the test's own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOKS = REPO / "hooks"
FIXTURES = REPO / "tests" / "fixtures" / "hook_inputs"
NAMER = HOOKS / "session_namer.py"
STATUSLINE = HOOKS / "statusline.py"
TRANSCRIPT = FIXTURES / "transcript.jsonl"
SID = "5b1e7c2a-8f0d-4c3e-9a61-2d4f7e90b3c8"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


namer = _load(NAMER)
statusline = _load(STATUSLINE)


def fixture_bytes(name: str, **override: Any) -> bytes:
    raw = (FIXTURES / name).read_bytes()
    if not override:
        return raw
    data = json.loads(raw)
    data.update(override)
    return json.dumps(data).encode()


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TMUX", "CODETAINER_"))}
    env.update(extra)
    return env


# -- tmux and the stand-in claude --------------------------------------------------


@dataclass
class Tmux:
    socket: Path
    server_pid: int

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return proc.stdout.strip()

    def sessions(self) -> list[str]:
        return self.run("list-sessions", "-F", "#{session_name}").splitlines()

    def pane_env(self, session: str) -> dict[str, str]:
        """$TMUX and $TMUX_PANE as a process in the session's first pane sees them."""
        pane = self.run("display-message", "-p", "-t", session, "#{pane_id}")
        sid = self.run("display-message", "-p", "-t", session, "#{session_id}")
        return {"TMUX": f"{self.socket},{self.server_pid},{sid.lstrip('$')}", "TMUX_PANE": pane}


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: apt-get install -y tmux")
    # A short directory of our own: tmux sockets must fit in sun_path (108 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="ct-hooks-", dir="/tmp"))
    socket = workdir / "tmux.sock"
    subprocess.run(
        ["tmux", "-S", str(socket), "-f", "/dev/null", "new-session", "-d", "-s", "work-0",
         "-x", "80", "-y", "24", "sleep 600"],
        check=True,
        timeout=10,
        env=base_env(),
    )
    pid = subprocess.run(
        ["tmux", "-S", str(socket), "display-message", "-p", "#{pid}"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout.strip()
    try:
        yield Tmux(socket=socket, server_pid=int(pid))
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True, timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


STAND_IN = """#!{python}
# Stand-in for the claude CLI: records its arguments and the namer's guard, answers
# with messy text, and, like the real CLI in print mode, runs the Stop hook itself.
import json, os, subprocess, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "guard": os.environ.get("CODETAINER_NAMER")}}) + "\\n")
time.sleep(float(os.environ.get("STAND_IN_DELAY", "0")))
hook_input = json.dumps({{"session_id": "namer-own-session", "hook_event_name": "Stop",
                         "transcript_path": {transcript!r}, "stop_hook_active": False}})
own = subprocess.run([sys.executable, {namer!r}], input=hook_input.encode(), timeout=30)
with open(os.path.join(here, "own_hook_rc"), "w") as fh:
    fh.write(str(own.returncode))
mode = open(os.path.join(here, "mode")).read().strip()
if mode == "fail":
    print("API Error: 529 overloaded", file=sys.stderr)
    sys.exit(1)
print("Sure! Here is a short name for this session:\\n\\n`Fix-Login-Redirect`.\\n")
"""


@dataclass
class StandIn:
    path: Path
    directory: Path

    def calls(self) -> list[dict[str, Any]]:
        log = self.directory / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def set_mode(self, mode: str) -> None:
        (self.directory / "mode").write_text(mode)


@pytest.fixture
def claude_bin(tmp_path: Path) -> StandIn:
    directory = tmp_path / "bin"
    directory.mkdir()
    path = directory / "claude"
    path.write_text(
        STAND_IN.format(python=sys.executable, transcript=str(TRANSCRIPT), namer=str(NAMER))
    )
    path.chmod(0o755)
    stand_in = StandIn(path=path, directory=directory)
    stand_in.set_mode("ok")
    return stand_in


def run_namer(
    data: bytes, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-IS", str(NAMER)],
        input=data,
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def namer_env(state: Path, claude: StandIn, tmux_env: dict[str, str], **extra: str) -> dict[str, str]:
    return base_env(
        CODETAINER_NAMER_STATE=str(state),
        CODETAINER_CLAUDE_BIN=str(claude.path),
        **tmux_env,
        **extra,
    )


# -- namer: pure parts ---------------------------------------------------------------


def test_safe_session_id_keeps_uuids_and_hashes_everything_else() -> None:
    assert namer.safe_session_id(SID) == SID
    for hostile in ("../../etc/x", "/etc/passwd", "a/b", "..", ".", "x\x00y", "é", "a" * 129):
        safe = namer.safe_session_id(hostile)
        assert safe is not None and re.fullmatch(r"h-[0-9a-f]{32}", safe), hostile
    assert namer.safe_session_id("../a") != namer.safe_session_id("../b")
    for missing in (None, "", 42, ["x"], {"a": 1}):
        assert namer.safe_session_id(missing) is None


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("fix-login-redirect", "fix-login-redirect"),
        ("Sure! Here is a name:\n\n`Fix-Login-Redirect`.\n", "fix-login-redirect"),
        ("**dns-allowlist-refresh**", "dns-allowlist-refresh"),
        ('"Refactor DNS Cache"', "refactor-dns-cache"),
        ("Name: Add OAuth Token Rotation", "add-oauth-token-rotation"),
        ("refactor-the-whole-dns-cache-layer-now", "refactor-the-whole-dns"),
        ("Fix   login -- redirect!!", "fix-login-redirect"),
        ("héllo wörld tests", "hello-world-tests"),
        ("日本語のテスト", None),
        ("x" * 80 + "-tests", "x" * 50),
        ("", None),
        ("   \n\n", None),
        ("!!! ... ???", None),
    ],
)
def test_sanitize_name(answer: str, expected: str | None) -> None:
    name = namer.sanitize_name(answer)
    assert name == expected
    if name is not None:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name)
        assert len(name) <= 50 and name.count("-") <= 3


def test_transcript_context_takes_the_request_and_skips_command_echoes() -> None:
    context = namer.transcript_context(str(TRANSCRIPT))
    assert context.startswith("user: After logging in, users land on /login again")
    assert "assistant: I'll look at how the login view" in context
    assert "<command-name>" not in context
    assert "tool_result" not in context
    assert namer.transcript_context("/nonexistent/t.jsonl") == ""
    assert namer.transcript_context(None) == ""


def test_tmux_location_from_environment() -> None:
    assert namer.tmux_location({"TMUX": "/tmp/s,123,4", "TMUX_PANE": "%7"}) == ("/tmp/s", "%7")
    assert namer.tmux_location({"TMUX": "/tmp/s,123,4"}) == ("/tmp/s", "$4")
    assert namer.tmux_location({"TMUX": "/tmp/s,123,4", "TMUX_PANE": "; rm"}) == ("/tmp/s", "$4")
    assert namer.tmux_location({}) is None
    assert namer.tmux_location({"TMUX": "garbage"}) is None


# -- namer: against a real tmux session and the stand-in claude -----------------------


def test_namer_renames_the_tmux_session_in_the_background(
    tmux: Tmux, claude_bin: StandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), STAND_IN_DELAY="1.5")
    data = fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT))

    started = time.monotonic()
    proc = run_namer(data, env)
    elapsed = time.monotonic() - started

    # capture_output waits for EOF on the pipes: returning at all proves the background
    # child let go of them, and returning before the 1.5 s model call proves no delay.
    assert proc.returncode == 0
    assert proc.stdout == b"" and proc.stderr == b""
    assert elapsed < 1.0, f"the hook held the agent for {elapsed:.2f}s"
    assert tmux.sessions() == ["work-0"]

    assert wait_for(lambda: tmux.sessions() == ["fix-login-redirect"]), tmux.sessions()
    assert wait_for(lambda: (state / f"{SID}.name").exists())
    assert (state / f"{SID}.name").read_text().strip() == "fix-login-redirect"

    calls = claude_bin.calls()
    assert len(calls) == 1
    argv = calls[0]["argv"]
    assert argv[:3] == ["-p", "--model", "haiku"] and len(argv) == 4
    assert "kebab-case" in argv[3]
    assert "users land on /login again" in argv[3]
    assert calls[0]["guard"] == "1"


def test_namer_does_not_recurse_through_its_own_claude_call(
    tmux: Tmux, claude_bin: StandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    proc = run_namer(fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT)), env)
    assert proc.returncode == 0

    # The stand-in ran the Stop hook as the real CLI would; the guard stopped it cold.
    assert (claude_bin.directory / "own_hook_rc").read_text() == "0"
    assert len(claude_bin.calls()) == 1
    assert not list(state.glob("namer-own-session*"))
    assert tmux.sessions() == ["fix-login-redirect"]


def test_namer_fires_once_per_session_id(tmux: Tmux, claude_bin: StandIn, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    data = fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT))
    assert run_namer(data, env).returncode == 0
    tmux.run("rename-session", "-t", "fix-login-redirect", "renamed-by-hand")
    for _ in range(3):
        assert run_namer(data, env).returncode == 0
    assert len(claude_bin.calls()) == 1
    assert tmux.sessions() == ["renamed-by-hand"]


def test_namer_failure_leaves_it_free_to_retry(
    tmux: Tmux, claude_bin: StandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    data = fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT))

    claude_bin.set_mode("fail")
    assert run_namer(data, env).returncode == 1
    assert tmux.sessions() == ["work-0"]
    assert not (state / f"{SID}.name").exists()
    assert "namer_model_failed" in (state / "namer.log").read_text()

    claude_bin.set_mode("ok")
    assert run_namer(data, env).returncode == 0
    assert tmux.sessions() == ["fix-login-redirect"]
    assert len(claude_bin.calls()) == 2


def test_namer_gives_up_after_max_attempts(tmux: Tmux, claude_bin: StandIn, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    data = fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT))
    claude_bin.set_mode("fail")
    for _ in range(namer.MAX_ATTEMPTS + 2):
        run_namer(data, env)
    assert len(claude_bin.calls()) == namer.MAX_ATTEMPTS


def test_namer_picks_a_free_name_when_taken(tmux: Tmux, claude_bin: StandIn, tmp_path: Path) -> None:
    tmux.run("new-session", "-d", "-s", "fix-login-redirect", "sleep 600")
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    assert run_namer(fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT)), env).returncode == 0
    assert sorted(tmux.sessions()) == ["fix-login-redirect", "fix-login-redirect-2"]


def test_namer_runs_from_inside_a_tmux_pane(tmux: Tmux, claude_bin: StandIn, tmp_path: Path) -> None:
    """As in the image: Claude Code, and so the hook, run in a pane of the session."""
    state = tmp_path / "state"
    hook_input = tmp_path / "stop.json"
    hook_input.write_bytes(fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT)))
    rc_file = tmp_path / "rc"
    command = f"{sys.executable} -IS {NAMER} < {hook_input}; echo $? > {rc_file}; sleep 600"
    tmux.run(
        "new-window", "-d", "-t", "work-0",
        "-e", f"CODETAINER_NAMER_STATE={state}",
        "-e", f"CODETAINER_CLAUDE_BIN={claude_bin.path}",
        command,
    )
    assert wait_for(lambda: rc_file.exists() and rc_file.read_text().strip() == "0")
    assert wait_for(lambda: tmux.sessions() == ["fix-login-redirect"]), tmux.sessions()


def test_namer_sanitises_hostile_session_ids_before_touching_a_path(
    tmux: Tmux, claude_bin: StandIn, tmp_path: Path
) -> None:
    state = tmp_path / "deep" / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    data = fixture_bytes("stop_hostile_id.json", transcript_path=str(TRANSCRIPT))
    assert run_namer(data, env).returncode == 0
    assert not (tmp_path / "etc").exists() and not (tmp_path / "deep" / "etc").exists()
    names = sorted(p.name for p in state.iterdir())
    assert names, "nothing recorded"
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name) and ".." not in name, name
    assert any(re.fullmatch(r"h-[0-9a-f]{32}\.name", n) for n in names)


@pytest.mark.parametrize(
    "data",
    [
        fixture_bytes("stop_missing_fields.json"),
        fixture_bytes("stop_malformed.txt"),
        b"",
        b"[1, 2, 3]",
        b"\xff\xfe garbage",
    ],
    ids=["missing-fields", "malformed", "empty", "not-an-object", "not-utf8"],
)
def test_namer_ignores_unusable_input(
    data: bytes, tmux: Tmux, claude_bin: StandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    proc = run_namer(data, env)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b""
    assert claude_bin.calls() == []
    assert not state.exists()


def test_namer_does_nothing_under_its_guard_or_outside_tmux(
    tmux: Tmux, claude_bin: StandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    data = fixture_bytes("stop.json", transcript_path=str(TRANSCRIPT))
    guarded = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER="1",
                        CODETAINER_NAMER_FOREGROUND="1")
    outside = namer_env(state, claude_bin, {}, CODETAINER_NAMER_FOREGROUND="1")
    for env in (guarded, outside):
        assert run_namer(data, env).returncode == 0
    assert claude_bin.calls() == []
    assert not state.exists()
    assert tmux.sessions() == ["work-0"]


def test_namer_without_transcript_counts_a_failed_attempt(
    tmux: Tmux, claude_bin: StandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = namer_env(state, claude_bin, tmux.pane_env("work-0"), CODETAINER_NAMER_FOREGROUND="1")
    assert run_namer(fixture_bytes("stop.json"), env).returncode == 1  # path does not exist
    assert claude_bin.calls() == []
    assert not (state / f"{SID}.name").exists()
    assert (state / f"{SID}.attempts").read_text().strip() == "1"


# -- status line ------------------------------------------------------------------------


def run_statusline(data: bytes, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-IS", str(STATUSLINE)],
        input=data,
        capture_output=True,
        env=env if env is not None else base_env(),
        timeout=10,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    out = proc.stdout.decode()
    assert out.endswith("\n") and out.count("\n") == 1
    return out.rstrip("\n")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def test_statusline_current_input() -> None:
    out = run_statusline(fixture_bytes("statusline.json"))
    assert plain(out) == "Opus 4.5 " + "█" * 8 + "░" * 12 + " 42%"
    assert "\x1b[32m" in out  # green at 42 %


def test_statusline_from_token_counts() -> None:
    # (1000 + 9000 + 140000) / 200000 = 75 % -> yellow, 15 of 20 cells
    out = run_statusline(fixture_bytes("statusline_current_usage.json"))
    assert plain(out) == "Sonnet 4.5 " + "█" * 15 + "░" * 5 + " 75%"
    assert "\x1b[33m" in out


def test_statusline_from_legacy_transcript() -> None:
    # last assistant usage in the transcript: 6 + 1421 + 19347 = 20774 of 200000
    out = run_statusline(fixture_bytes("statusline_legacy.json", transcript_path=str(TRANSCRIPT)))
    assert plain(out) == "Sonnet 4.5 " + "██" + "░" * 18 + " 10%"


@pytest.mark.parametrize(
    "name", ["statusline_missing_fields.json", "statusline_malformed.txt", "statusline_legacy.json"]
)
def test_statusline_without_usable_fields(name: str) -> None:
    # statusline_legacy.json names a transcript that does not exist here
    out = run_statusline(fixture_bytes(name))
    text = plain(out)
    assert text.endswith("░" * 20 + " --%")
    assert text.startswith("Sonnet 4.5 " if "legacy" in name else "Claude ")


@pytest.mark.parametrize("data", [b"", b"null", b"[]", b'{"model": "opus", "context_window": 5}'])
def test_statusline_odd_shapes(data: bytes) -> None:
    assert plain(run_statusline(data)) == "Claude " + "░" * 20 + " --%"


@pytest.mark.parametrize(
    ("pct", "colour", "cells"),
    [
        (0, "\x1b[32m", 0),
        (65, "\x1b[32m", 13),
        (65.4, "\x1b[33m", 13),
        (85, "\x1b[33m", 17),
        (85.1, "\x1b[31m", 17),
        (100, "\x1b[31m", 20),
        (140, "\x1b[31m", 20),
        (-5, "\x1b[32m", 0),
    ],
)
def test_statusline_bar_colours_and_cells(pct: float, colour: str, cells: int) -> None:
    data = {"model": {"display_name": "M"}, "context_window": {"used_percentage": pct}}
    out = statusline.render(data, {})
    assert colour in out
    bar = plain(out).split(" ")[1]
    assert len(bar) == 20 and bar.count("█") == cells


def test_statusline_no_color_and_control_characters() -> None:
    data = {"model": {"display_name": "Evil\x1b[2J\x07Model"}, "context_window": {"used_percentage": 50}}
    out = statusline.render(data, {"NO_COLOR": "1"})
    assert "\x1b" not in out and "\x07" not in out
    assert out == "Evil[2JModel " + "█" * 10 + "░" * 10 + " 50%"


def test_statusline_shows_the_tmux_session_name(tmux: Tmux) -> None:
    out = run_statusline(fixture_bytes("statusline.json"), base_env(**tmux.pane_env("work-0")))
    assert plain(out).endswith(" 42% work-0")
    tmux.run("rename-session", "-t", "work-0", "fix-login-redirect")
    out = run_statusline(fixture_bytes("statusline.json"), base_env(**tmux.pane_env("fix-login-redirect")))
    assert plain(out).endswith(" 42% fix-login-redirect")


def test_statusline_with_a_dead_tmux_server_still_prints(tmp_path: Path) -> None:
    env = base_env(TMUX=f"{tmp_path}/gone.sock,1,0", TMUX_PANE="%0")
    assert plain(run_statusline(fixture_bytes("statusline.json"), env)).endswith(" 42%")


# -- the settings template wires the hooks ----------------------------------------------


def rendered_settings(hooks_dir: Path) -> dict[str, Any]:
    text = (HOOKS / "settings.template.json").read_text()
    assert "{{HOOKS_DIR}}" in text
    return json.loads(text.replace("{{HOOKS_DIR}}", str(hooks_dir)))  # type: ignore[no-any-return]


def test_settings_template_defaults() -> None:
    settings = rendered_settings(HOOKS)
    assert settings["permissions"]["defaultMode"] == "bypassPermissions"
    assert settings["statusLine"]["type"] == "command"
    stop = settings["hooks"]["Stop"]
    assert len(stop) == 1 and stop[0]["hooks"][0]["type"] == "command"
    assert set(settings["hooks"]) == {"Stop"}


def test_settings_template_commands_run_the_hooks() -> None:
    """Run the rendered commands through a shell, as Claude Code does."""
    settings = rendered_settings(HOOKS)
    status_cmd = settings["statusLine"]["command"]
    stop_cmd = settings["hooks"]["Stop"][0]["hooks"][0]["command"]
    assert str(STATUSLINE) in status_cmd and str(NAMER) in stop_cmd

    out = subprocess.run(
        ["sh", "-c", status_cmd], input=fixture_bytes("statusline.json"),
        capture_output=True, env=base_env(), timeout=10, check=True,
    ).stdout.decode()
    assert plain(out).strip() == "Opus 4.5 " + "█" * 8 + "░" * 12 + " 42%"

    proc = subprocess.run(
        ["sh", "-c", stop_cmd], input=fixture_bytes("stop.json"),
        capture_output=True, env=base_env(), timeout=10, check=False,
    )
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b""


def test_hooks_use_only_the_standard_library() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in (NAMER, STATUSLINE):
        for match in re.finditer(r"^(?:from|import)\s+([A-Za-z_][\w]*)", path.read_text(), re.M):
            module = match.group(1)
            assert module in stdlib or module == "__future__", f"{path.name} imports {module}"


def test_namer_hands_claude_its_token_on_a_descriptor_not_the_environment(
        tmp_path: Path) -> None:
    """Claude Code strips CLAUDE_CODE_OAUTH_TOKEN from a hook's environment, so the
    namer's ``claude -p`` would not be logged in: it gets the daemon's token file on a
    descriptor (CLAUDE_CODE_OAUTH_TOKEN_FILE_DESCRIPTOR), and the token never enters an
    environment."""
    home = tmp_path / "home"
    token = home.joinpath(*namer.TOKEN_FILE)
    token.parent.mkdir(parents=True)
    token.write_text("sk-ant-oat01-hooktoken")
    fake = tmp_path / "claude"
    fake.write_text("#!/bin/sh\nfd=$CLAUDE_CODE_OAUTH_TOKEN_FILE_DESCRIPTOR\n"
                    "printf 'fd=%s token=' \"$fd\"; [ -z \"$fd\" ] || cat /dev/fd/$fd; echo\n"
                    "env | grep -c sk-ant-oat01 || true\n")
    fake.chmod(0o755)
    out = namer.ask_model("ctx", {"HOME": str(home), "CODETAINER_CLAUDE_BIN": str(fake),
                                  "PATH": "/usr/bin:/bin"}, tmp_path)
    assert out is not None
    first, count = out.splitlines()
    assert re.fullmatch(r"fd=\d+ token=sk-ant-oat01-hooktoken", first), out
    assert count == "0"  # not in the child's environment
    # a token in the environment (no hook stripped it) is used as it is, no file opened
    out = namer.ask_model("ctx", {"HOME": str(tmp_path / "nohome"), "PATH": "/usr/bin:/bin",
                                  "CODETAINER_CLAUDE_BIN": str(fake),
                                  "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-env"}, tmp_path)
    assert out is not None and out.startswith("fd= token=")
