"""The real Claude Code CLI as the agent, end to end, in one full boot.

codetainerd boots as PID 1 in a scratch root joined to the test world, with the default
agent command (``claude --dangerously-skip-permissions``, the CLI ``./dev setup``
installs at the Dockerfile's pin) and a ``CLAUDE_PROMPT``. The CLI reaches the stand-in
for Anthropic's API (codetainer/sandbox/apistandin.py) under ``api.anthropic.com``, through the
allowlist DNS and the firewall, trusting the stand-in's test CA through
``NODE_EXTRA_CA_CERTS``. What is asserted is what a user sees (the agent pane, read with
``capture-pane``) and what the API received.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import ApiStandIn, FullBoot, machine_with_repo
from codetainer.sandbox.world import NEVER_HOSTS

pytestmark = pytest.mark.integration

UID = 1000
SOCK = "/run/codetainer/tmux/agent.sock"
GH_PAT = "ghp_E2EsecretToken0123456789"
OAUTH = "sk-ant-oat01-E2EoauthSECRET987654"
#: multi-line, with what a shell would make something of
PROMPT = "Look at the repo.\nThen: echo $HOME `id` \"quoted\" 'single' ; | & > < *\n  done"
AS_AGENT = ("setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
            "--bounding-set=-all", "--")
DIALOGS = ("Make auto mode your default", "Do you trust", "Bypass Permissions mode",
           "Choose the text style", "Select login method", "Yes, I accept", "Auto-update failed",
           "Remote managed settings failed", "Unable to connect to API")


def messages(api: ApiStandIn, entrypoint: str | None = None) -> list[dict[str, Any]]:
    return [r for r in api.requests() if r["method"] == "POST"
            and r["path"].split("?")[0] == "/v1/messages"]


def last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body["messages"] if m.get("role") == "user"]
    content = users[-1]["content"]
    if isinstance(content, str):
        return content
    texts = [b["text"] for b in content if b.get("type") == "text"]
    return texts[-1] if texts else ""  # a turn of tool results only


@pytest.fixture(scope="module")
def machine() -> Iterator[tuple[FullBoot, ApiStandIn]]:
    if shutil.which("claude") is None:
        pytest.fail("the Claude Code CLI is not installed: run ./dev setup")
    env = {"CLAUDE_CODE_OAUTH_TOKEN": OAUTH, "CLAUDE_PROMPT": PROMPT,
           "CODETAINER_AGENT_COMMAND": "claude --dangerously-skip-permissions"}
    with machine_with_repo("ct-claude-", GH_PAT, env, api=True) as (fb, api, _):
        assert api is not None
        yield fb, api


def agent_pane(fb: FullBoot) -> str:
    pane: str = fb.session()["agent_pane"]  # status's pane list waits for a monitor tick
    return pane


def screen(fb: FullBoot) -> str:
    target = agent_pane(fb)
    r = fb.inside(*AS_AGENT, "tmux", "-S", SOCK, "capture-pane", "-p", "-t", target)
    assert r.returncode == 0, r.stderr
    return r.stdout


def until_screen(fb: FullBoot, pred: Callable[[str], Any], what: str,
                 timeout: float = 60) -> str:
    text: str = wait_for(lambda: (s := screen(fb)) and pred(s) and s, timeout, what,
                         context=lambda: screen(fb))
    return text


def input_box(text: str) -> str:
    """What is typed in the TUI's input box: the lines between its two rules."""
    rules = [i for i, line in enumerate(text.splitlines()) if line.startswith("────")]
    lines = text.splitlines()
    return "\n".join(lines[rules[-2] + 1:rules[-1]]) if len(rules) >= 2 else ""


def keys(fb: FullBoot, *args: str) -> None:
    r = fb.inside(*AS_AGENT, "tmux", "-S", SOCK, "send-keys", "-t", agent_pane(fb), *args)
    assert r.returncode == 0, r.stderr


def idle(text: str) -> bool:
    """The TUI is up and not working on a turn (no "esc to interrupt" in its footer)."""
    return "bypass permissions on" in text and "esc to interrupt" not in text


def type_prompt(fb: FullBoot, text: str) -> None:
    """Type ``text`` into the agent's input box, then Enter once the TUI shows it there
    (an Enter that arrives with the typed burst is taken as part of a paste)."""
    until_screen(fb, idle, "the TUI idle, ready for input")
    keys(fb, "-l", text)
    until_screen(fb, lambda s: text[:40] in input_box(s), "the typed prompt in the input box")
    keys(fb, "Enter")
    until_screen(fb, lambda s: text[:40] not in input_box(s), "the prompt submitted")


def test_tui_comes_up_with_no_dialog_in_the_repository(
        machine: tuple[FullBoot, ApiStandIn]) -> None:
    fb, _api = machine
    text = until_screen(fb, lambda s: "Claude Code v" in s and "bypass permissions on" in s,
                        "the Claude Code TUI")
    assert "/workspace/repo" in text, text
    for dialog in DIALOGS:
        assert dialog not in text, f"{dialog!r} on screen:\n{text}"


def test_status_line_is_drawn_by_the_real_cli(machine: tuple[FullBoot, ApiStandIn]) -> None:
    fb, _ = machine
    # hooks/statusline.py: model, context bar, percentage, tmux session name
    until_screen(fb, lambda s: re.search(r"[░█▓]{10,} (\d+|--)% \S+", s),
                 "hooks/statusline.py's line")


def test_prompt_reaches_the_api_exactly_and_the_reply_is_rendered(
        machine: tuple[FullBoot, ApiStandIn]) -> None:
    fb, api = machine
    first = wait_for(lambda: messages(api), 60, "the first Messages request")[0]
    assert last_user_text(first["body"]) == PROMPT
    assert first["auth"] == "bearer"
    until_screen(fb, lambda s: "STANDIN-REPLY: Look at the repo. Then: echo $HOME" in s,
                 "the stand-in's reply in the pane")


def test_bash_tool_runs_as_the_agent_through_the_firewall(
        machine: tuple[FullBoot, ApiStandIn]) -> None:
    """A tool_use of Bash from the API runs in the container as uid 1000: an allowlisted
    world host connects, an address no entry allows is refused; the transcript shows both."""
    fb, api = machine
    until_screen(fb, lambda s: "STANDIN-REPLY" in s, "the first turn to finish")
    denied = NEVER_HOSTS[0]
    cmd = (f"id -u; for h in github.com {denied}; do (exec 3<>/dev/tcp/$h/443) 2>/dev/null "
           "&& echo $h CONNECTED || echo $h REFUSED; done")
    before = len(messages(api))
    type_prompt(fb, f"RUN: {cmd}")

    def tool_result() -> str | None:
        for r in messages(api)[before:]:
            for m in r["body"]["messages"]:
                for b in m.get("content") if isinstance(m.get("content"), list) else []:
                    if b.get("type") == "tool_result":
                        c = b.get("content")
                        return c if isinstance(c, str) else json.dumps(c)
        return None

    result = wait_for(tool_result, 90, "the Bash tool's result at the API",
                      context=lambda: screen(fb))
    assert result.splitlines()[0].strip() == str(UID), result
    assert "github.com CONNECTED" in result, result  # a world host, by the allowlist DNS
    assert f"{denied} REFUSED" in result, result
    until_screen(fb, lambda s: "TOOL-SAID:" in s and "CONNECTED" in s, "the tool's result")


def test_the_session_namer_renames_the_tmux_session(machine: tuple[FullBoot, ApiStandIn]) -> None:
    """The Stop hook runs hooks/session_namer.py, whose own ``claude -p --model haiku``
    goes to the stand-in, and renames the session with its answer."""
    fb, api = machine
    from codetainer.sandbox.apistandin import NAMER_PROMPT, NAMER_TITLE

    wait_for(lambda: fb.session().get("name") == NAMER_TITLE, 90, "the renamed session",
             context=lambda: json.dumps(fb.session()))
    asks = [r for r in messages(api) if last_user_text(r["body"]).startswith(NAMER_PROMPT)]
    assert asks and all(r["auth"] == "bearer" for r in asks)


def test_the_oauth_token_reaches_the_api_only_as_the_authorization(
        machine: tuple[FullBoot, ApiStandIn]) -> None:
    fb, api = machine
    wait_for(lambda: messages(api), 60, "a Messages request")
    assert all(r["auth"] == "bearer" for r in messages(api))
    assert OAUTH not in json.dumps(api.requests())  # not in a body or a URL either
    assert OAUTH not in fb.log()
    assert OAUTH not in json.dumps(fb.status())
    r = fb.inside("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert r.returncode == 0 and "claude" in r.stdout and OAUTH not in r.stdout


@pytest.mark.parametrize(("status", "shown"), [
    (529, r"(?i)API Error: 529|overloaded"),
    (500, r"API Error: 500 stand-in answered 500"),
    (401, r"Please run /login · API Error: 401"),
])
def test_an_api_error_is_shown_and_breaks_nothing(machine: tuple[FullBoot, ApiStandIn],
                                                  status: int, shown: str) -> None:
    fb, api = machine
    type_prompt(fb, f"FAIL: {status} please")
    until_screen(fb, lambda s: re.search(shown, s) and idle(s), f"the API's {status} shown")
    st = fb.status()
    assert st["state"] == "READY" and st["session"]["state"] == "RUNNING"
    assert any(last_user_text(r["body"]) == f"FAIL: {status} please" for r in messages(api))


def test_the_agent_exiting_is_respawned(machine: tuple[FullBoot, ApiStandIn]) -> None:
    """``/exit`` ends the real CLI; the daemon respawns it (policy ``respawn``) and the
    TUI comes back, without the one-shot prompt."""
    fb, api = machine
    before = fb.status()["session"]["restarts"]["agent"]
    asked = len(messages(api))
    type_prompt(fb, "/exit")
    wait_for(lambda: fb.status()["session"]["restarts"]["agent"] == before + 1, 60,
             "the agent respawned", context=lambda: screen(fb))
    until_screen(fb, lambda s: "Claude Code v" in s and "bypass permissions on" in s
                 and "STANDIN-REPLY" not in s, "the TUI again, fresh")
    exits = [e for e in fb.events() if e.get("event") == "session_agent_exited"]
    assert exits, "no session_agent_exited event"
    assert len([r for r in messages(api)[asked:]
                if last_user_text(r["body"]) == PROMPT]) == 0  # the prompt is not replayed


def test_a_missing_cli_is_shown_in_the_pane_and_in_status() -> None:
    """An image without the CLI (or a wrong CODETAINER_AGENT_COMMAND): the pane says
    what the shell said, status counts the exits, the daemon stays READY."""
    from codetainer.sandbox.fullboot import full_boot

    with full_boot(env={"CODETAINER_AGENT_COMMAND": "claude-not-installed --flag"}) as fb:
        assert fb.wait_boot()["state"] == "READY"
        fb.wait_session()
        exited = wait_for(lambda: [e for e in fb.events()
                                   if e.get("event") == "session_agent_exited"], 30,
                          "the agent's exit", context=lambda: fb.log()[-2000:])
        assert exited[0]["status"] == 127, exited
        until_screen(fb, lambda s: "codetainer: claude-not-installed: command not found" in s,
                     "the reason in the pane")
        # status counts it: the exit is respawned with backoff, and each is an exit 127
        st = wait_for(lambda: (s := fb.status())["session"]["restarts"]["agent"] >= 1 and s,
                      30, "a respawn in status")
        assert st["state"] == "READY"
        assert all(e["status"] == 127 for e in fb.events()
                   if e.get("event") == "session_agent_exited")


MARKETPLACE = {
    ".claude-plugin/marketplace.json": json.dumps({
        "name": "local-test", "owner": {"name": "codetainer tests"},
        "plugins": [{"name": "hello", "source": "./plugins/hello",
                     "description": "a test plugin"}]}),
    "plugins/hello/.claude-plugin/plugin.json": json.dumps({
        "name": "hello", "version": "1.0.0", "description": "a test plugin"}),
    "plugins/hello/commands/hello.md": "---\ndescription: say hello\n---\nSay hello.\n",
}


def test_plugins_from_a_local_marketplace_with_the_real_cli(tmp_path: Path) -> None:
    """``CODETAINER_PLUGINS``: the real ``claude plugin marketplace add`` and ``install``
    succeed for a good entry; a plugin the marketplace lacks is a warning (boot DEGRADED)
    with the CLI's own reason; the agent still starts."""
    from codetainer.sandbox.fullboot import full_boot

    base = tmp_path / "boot"
    base.mkdir()
    base.chmod(0o755)
    for rel, text in MARKETPLACE.items():
        path = base / "out" / "mkt" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for p in (base / "out" / "mkt").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    plugins = "/scratch-out/mkt,hello@local-test,nope@local-test"
    with full_boot(env={"CODETAINER_PLUGINS": plugins}, base=base) as fb:
        st = fb.wait_boot()
        assert st["state"] == "DEGRADED", st["reasons"]
        step = next(s for s in st["steps"] if s["name"] == "plugins")
        assert step["state"] == "DEGRADED", step
        assert "1 of 3 plugin commands failed" in step["reason"], step
        assert 'Plugin "nope" not found in marketplace "local-test"' in step["reason"], step
        listed = fb.inside(*AS_AGENT, "env", "HOME=/home/claude", "claude", "plugin", "list")
        assert "hello@local-test" in listed.stdout, listed.stdout + listed.stderr
        fb.wait_session()
