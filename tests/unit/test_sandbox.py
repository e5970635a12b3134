"""``./dev sandbox -e NAME=VALUE``: the daemon's environment, as ``fly machine run -e`` sets it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from codetainer.sandbox import fullboot
from codetainer.sandbox import main as sandbox
from codetainer.sandbox.main import parse_env


def test_pairs_become_the_environment_the_last_one_winning() -> None:
    assert parse_env([]) == {}
    assert parse_env(["CODETAINER_DNS_ENGINE=dnsmasq", "FLY_MACHINE_ID=148e272c1d2e89",
                      "EMPTY=", "A_B=x=y", "CODETAINER_DNS_ENGINE=coredns"]) == {
        "CODETAINER_DNS_ENGINE": "coredns", "FLY_MACHINE_ID": "148e272c1d2e89", "EMPTY": "",
        "A_B": "x=y"}


@pytest.mark.parametrize("pair", ["NOEQUALS", "=value", "1ABC=x", "A-B=x", "A B=x", "Ä=x",
                                  "A=\0"])
def test_a_malformed_pair_exits_64_naming_it(pair: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sandbox.main(["-e", "GOOD=1", "-e", pair]) == 64
    err = capsys.readouterr().err
    assert err.startswith("sandbox: -e ") and "GOOD" not in err
    assert pair.partition("=")[0][:10] in err


def test_the_pairs_reach_the_daemon_and_the_usual_lines_are_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    seen: dict[str, Any] = {}

    @contextlib.contextmanager
    def fake_proxy_boot(base: Path, env: Mapping[str, str], **kw: Any) -> Iterator[Any]:
        seen["env"] = dict(env)
        popen = SimpleNamespace(poll=lambda: 0)
        yield SimpleNamespace(proc=SimpleNamespace(pid=4242, popen=popen), log_path="LOG",
                              socket="SOCK", wait_boot=lambda timeout: {}, stop=lambda: 0), None

    def fake_run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen["status"] = argv
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(fullboot, "proxy_boot", fake_proxy_boot)
    monkeypatch.setattr(sandbox.subprocess, "run", fake_run)
    monkeypatch.setattr(sandbox.sys.stdin, "isatty", lambda: False)
    monkeypatch.setattr(sandbox.signal, "signal", lambda *a: None)  # pytest keeps its SIGTERM
    code = sandbox.main(["--dir", str(tmp_path / "sb"), "--agent-command", "bash -l",
                         "-e", "FLY_MACHINE_ID=148e272c1d2e89", "-e", "CODETAINER_DNS_ENGINE=dnsmasq",
                         "-e", "GH_PAT=ghp_notprinted"])
    assert code == 0
    env = seen["env"]
    assert env["FLY_MACHINE_ID"] == "148e272c1d2e89" and env["GH_PAT"] == "ghp_notprinted"
    assert env["CODETAINER_DNS_ENGINE"] == "dnsmasq"  # -e wins over --dns-engine's default
    assert env["CODETAINER_AGENT_COMMAND"] == "bash -l"
    out = capsys.readouterr().out
    assert "sandbox: -e CODETAINER_DNS_ENGINE, FLY_MACHINE_ID, GH_PAT\n" in out
    assert "ghp_notprinted" not in out  # names only
    assert "sandbox: codetainerd is PID 1 (host pid 4242)" in out
    assert "--socket SOCK status" in out and seen["status"][-1] == "status"
