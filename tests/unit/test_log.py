"""Log format: JSON lines when stdout is not a TTY, console lines on a TTY (log.configure).

Each case runs in its own Python process, with stdout a real pseudo-terminal or a real
pipe, so the test process's own structlog configuration is never touched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SNIPPET = """
import os, structlog
from codetainer import log
log.configure("info", os.environ["FMT"])
logger = structlog.get_logger("codetainer.test")
logger.debug("hidden_event")
logger.info("hello_event", answer=42, word="two words")
"""
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")
ANSI = "\x1b["


def run(fmt: str, *, tty: bool) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FMT": fmt, "TERM": "xterm"}
    argv = [sys.executable, "-c", SNIPPET]
    if not tty:
        r = subprocess.run(argv, capture_output=True, env=env, timeout=30, check=False)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, env=env)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def assert_json_line(out: str) -> None:
    lines = out.splitlines()
    assert len(lines) == 1, out  # the debug line is filtered at level info
    ev = json.loads(lines[0])
    assert ev["event"] == "hello_event"
    assert (ev["answer"], ev["word"], ev["level"]) == (42, "two words", "info")
    assert ISO_UTC.match(ev["timestamp"]), ev
    assert ANSI not in out


def assert_console_line(out: str, *, colors: bool) -> None:
    lines = out.splitlines()
    assert len(lines) == 1, out
    with pytest.raises(ValueError):
        json.loads(lines[0])
    plain = re.sub(r"\x1b\[[0-9;]*m", "", lines[0])
    assert re.match(r"^\d{4}-\d\d-\d\dT[0-9:.]+Z \[info\s*\] hello_event\s+", plain), plain
    assert "answer=42" in plain and "word='two words'" in plain
    assert (ANSI in lines[0]) is colors, repr(lines[0])
    assert "hidden_event" not in out


def test_auto_is_json_lines_on_a_pipe() -> None:
    assert_json_line(run("auto", tty=False))


def test_auto_is_colored_console_lines_on_a_tty() -> None:
    assert_console_line(run("auto", tty=True), colors=True)


def test_json_forced_on_a_tty() -> None:
    assert_json_line(run("json", tty=True))


def test_console_forced_on_a_pipe_has_no_colors() -> None:
    assert_console_line(run("console", tty=False), colors=False)
