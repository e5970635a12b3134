"""Unit tests: prompt file, usage figures, plugin parsing, tmux output parsing, tmux.conf."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import psutil
import pytest
from codetainer.session import prompt as pm
from codetainer.session.plugins import parse_plugins, plugins_step
from codetainer.session.tmux import CONFIG_FILE
from codetainer.session.tmuxctl import parse_snapshot
from codetainer.session.usage import TreeSampler, bar, mounts_usage
from codetainer.units import human_bytes

# -- prompt -----------------------------------------------------------------------------


def test_digest_is_sha256() -> None:
    assert pm.digest("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_find_prompt_prefers_secrets_and_skips_empty() -> None:
    assert pm.find_prompt({"CLAUDE_PROMPT": "a"}, {"CLAUDE_PROMPT": "b"}) == "a"
    assert pm.find_prompt({"CLAUDE_PROMPT": ""}, {"CLAUDE_PROMPT": "b"}) == "b"
    assert pm.find_prompt(None, {}) is None


def test_prompt_file_is_private_and_exact(tmp_path: Path) -> None:
    f = tmp_path / "prompt"
    pm.write_prompt_file(str(f), "line 1\nline 2 'q' $X", os.getuid(), os.getgid())
    st = f.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert f.read_text() == "line 1\nline 2 'q' $X"


def test_prompt_file_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("untouched")
    link = tmp_path / "prompt"
    link.symlink_to(target)
    pm.write_prompt_file(str(link), "secret plan", os.getuid(), os.getgid())
    assert target.read_text() == "untouched"
    assert not link.is_symlink() and link.read_text() == "secret plan"


def test_wrapper_script_never_contains_the_prompt_and_quotes_the_path() -> None:
    script = pm.wrapper_script("claude --dangerously-skip-permissions", "/run/x y/prompt")
    assert "'/run/x y/prompt'" in script
    assert script.count("exec claude --dangerously-skip-permissions") == 2
    assert 'rm -f -- "$f"' in script


# -- usage ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pct", "expected"), [
    (0, "[" + "-" * 20 + "]"), (50, "[" + "#" * 10 + "-" * 10 + "]"),
    (100, "[" + "#" * 20 + "]"), (140, "[" + "#" * 20 + "]"), (-3, "[" + "-" * 20 + "]"),
])
def test_bar(pct: float, expected: str) -> None:
    assert bar(pct) == expected


def test_human_bytes() -> None:
    assert human_bytes(512) == "512B"
    assert human_bytes(1536) == "1.5K"
    assert human_bytes(512 * 1024**2) == "512M"
    assert human_bytes(3 * 1024**4) == "3.0T"


def test_mounts_usage_reports_existing_paths_only(tmp_path: Path) -> None:
    rows = mounts_usage([str(tmp_path), str(tmp_path / "missing")])
    assert [r["path"] for r in rows] == [str(tmp_path)]
    row = rows[0]
    assert row["total"] > 0 and 0 <= row["percent"] <= 100
    assert row["bar"].startswith("[") and "%" in row["bar"]
    assert row["mountpoint"] is not None and row["warn"] == (row["percent"] >= 90)


def test_tree_sampler_measures_own_tree() -> None:
    s = TreeSampler()
    first = s.sample(os.getpid())
    assert first is not None and first["processes"] >= 1 and first["rss_bytes"] > 0
    sum(range(200_000))
    second = s.sample(os.getpid())
    assert second is not None and second["cpu_percent"] >= 0.0
    assert s.sample(None) is None


def test_tree_sampler_dead_pid() -> None:
    pid = max(psutil.pids()) + 100_000
    assert TreeSampler().sample(pid) is None


# -- plugins ----------------------------------------------------------------------------


def test_parse_plugins_splits_sources_and_plugins() -> None:
    plan = parse_plugins(" anthropics/claude-code, commit-commands@cc,,"
                         "https://example.com/m.json, lint, commit-commands@cc, /opt/mkt")
    assert plan.marketplaces == ("anthropics/claude-code", "https://example.com/m.json",
                                 "/opt/mkt")
    assert plan.plugins == ("commit-commands@cc", "lint")
    assert plan.commands()[0] == ["plugin", "marketplace", "add", "anthropics/claude-code"]
    assert plan.commands()[-1] == ["plugin", "install", "lint"]


@pytest.mark.parametrize("bad", ["--evil", "a b", "x@y@z", "-o/x", "name;rm"])
def test_parse_plugins_rejects_bad_entries(bad: str) -> None:
    with pytest.raises(ValueError, match="CODETAINER_PLUGINS"):
        parse_plugins(bad)


def test_parse_plugins_empty() -> None:
    plan = parse_plugins("")
    assert plan.marketplaces == () and plan.plugins == () and plan.commands() == []


def test_plugins_step_shape() -> None:
    step = plugins_step(requires=("network",))
    assert step.name == "plugins" and step.policy.value == "degraded"
    assert step.requires == ("network",)


# -- tmux output ------------------------------------------------------------------------


def test_parse_snapshot() -> None:
    out = ("P\t$3\tfix tests\t%5\t0\t1\t137\tSIGKILL\t41\tclaude\tagent\t40\n"
           "P\t$3\tfix tests\t%6\t1\t0\t\t\t42\tbash\tshell\t40\n"
           "C\t/dev/pts/4\t99\t0\txterm-256color\t120x40\t1700000000\n")
    snap = parse_snapshot(out)
    assert snap is not None
    assert (snap.session_id, snap.name, snap.server_pid) == ("$3", "fix tests", 40)
    agent, shell = snap.panes
    assert agent.dead and agent.dead_status == 137 and agent.dead_signal == "SIGKILL"
    assert agent.role == "agent" and agent.pid == 41
    assert not shell.dead and shell.dead_status is None and shell.command == "bash"
    assert snap.clients == [{"tty": "/dev/pts/4", "pid": 99, "uid": 0,
                             "term": "xterm-256color", "size": "120x40",
                             "since": 1700000000}]


def test_parse_snapshot_empty() -> None:
    assert parse_snapshot("") is None
    assert parse_snapshot("garbage\n") is None


def test_tmux_conf_has_the_required_settings() -> None:
    text = CONFIG_FILE.read_text()
    for needle in ("RGB", "extended-keys on", "allow-passthrough on", "escape-time 0",
                   "history-limit", "mouse on", "set-clipboard on", "status off",
                   "remain-on-exit on", 'update-environment ""'):
        assert needle in text, needle


def test_wrapper_says_in_the_pane_when_the_agent_program_is_missing() -> None:
    """sh's own 'not found' is the pane's first line, which tmux's "Pane is dead" line
    scrolls away: the wrapper's own message starts with an empty line and survives."""
    missing = pm.wrapper_script("claude-not-installed --x", "/nonexistent/prompt")
    r = subprocess.run(["sh", "-c", missing], capture_output=True, text=True, timeout=10)
    assert r.returncode == 127
    assert r.stderr.startswith("\ncodetainer: claude-not-installed: command not found")
    present = pm.wrapper_script("echo agent-ran", "/nonexistent/prompt")
    r = subprocess.run(["sh", "-c", present], capture_output=True, text=True, timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (0, "agent-ran\n", "")
