"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from codetainer.daemon import Daemon
from codetainer.settings import Settings

#: one idle program: a daemon with its services up and no boot step
IDLE_SERVICES = """[supervisord]
[program:idle]
command=/bin/sleep 1000
startsecs=0
"""


@pytest.fixture
async def idle_daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A real Daemon (control socket, services, no boot steps) started in this process."""
    conf = tmp_path / "s.conf"
    conf.write_text(IDLE_SERVICES)
    settings = Settings(socket=str(tmp_path / "c.sock"), services=str(conf),
                        run_dir=str(tmp_path / "run"))
    d = Daemon(settings, [], set())
    await d.startup()
    yield d
    await d._orderly()
    await d.control.close()
