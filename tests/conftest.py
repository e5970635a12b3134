"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A scratch directory every uid can enter and write (pytest's tmp_path is root-only).

    Tests that run processes as other uids (the agent, nobody) put sockets and files here.
    """
    path = Path(tempfile.mkdtemp(prefix="ct-test-", dir="/tmp"))
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
