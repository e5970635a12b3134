"""Run the real codetainerd for integration tests: as PID 1 in fresh namespaces, or plainly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from codetainer.control.client import Client, DaemonUnreachable

BIN = Path(sys.executable).parent
CODETAINERD = str(BIN / "codetainerd")


def wait_for(pred: Any, timeout: float, what: str, *, interval: float = 0.05,
             context: Any = None) -> Any:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes
    (AssertionError naming ``what``, the last value, and ``context()`` if given)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{context()}" if context is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}{extra}")


def log_events(text: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines as events (anything else in the log is skipped)."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


class DaemonProc:
    def __init__(self, tmp: Path, services: str, *, pid1: bool = True, steps: str = "services",
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 netns: str | None = None) -> None:
        """``netns``: run inside that existing network namespace (the test world's) instead
        of a fresh, empty one."""
        self.tmp = tmp
        self.socket = str(tmp / "control.sock")
        self.conf = tmp / "services.conf"
        self.conf.write_text(services)
        self.log_path = tmp / "daemon.log"
        self.pid1 = pid1
        argv = [CODETAINERD, "--services", str(self.conf), "--socket", self.socket]
        if steps:
            argv += ["--steps", steps]
        argv += extra_args or []
        if pid1 and netns:
            argv = ["ip", "netns", "exec", netns, "unshare", "--pid", "--fork", "--mount-proc",
                    "--mount", "--uts", "--kill-child", *argv]
        elif pid1:
            argv = ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--uts", "--net",
                    "--kill-child", *argv]
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "CODETAINER_RUN_DIR": str(tmp / "run"), "CODETAINER_LOG_LEVEL": "debug",
                    "CODETAINER_PROXY": "off"}  # a test's env may turn it on
        full_env.update(env or {})
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=full_env, start_new_session=True)

    @property
    def init_pid(self) -> int:
        """Host pid of the init (PID 1 inside the namespace when pid1=True)."""
        if not self.pid1:
            return self.proc.pid
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            kids = psutil.Process(self.proc.pid).children()
            if kids:
                return kids[0].pid
            time.sleep(0.01)
        raise RuntimeError("unshare did not start codetainerd")

    def wait_socket(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(DaemonUnreachable):
                self.call("ping")
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"daemon socket never appeared:\n{self.log()}")

    def call(self, op: str, **args: Any) -> Any:
        with Client(self.socket, timeout=10) as c:
            return c.call(op, **args)

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.call("status")
        return st

    def service(self, name: str) -> dict[str, Any]:
        for s in self.status()["services"]:
            if s["name"] == name:
                return dict(s)
        raise KeyError(name)

    def wait_until(self, pred: Any, timeout: float = 10.0, what: str = "condition") -> Any:
        return wait_for(pred, timeout, what, interval=0.02, context=lambda: self.log()[-3000:])

    def signal(self, sig: int) -> None:
        os.kill(self.init_pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log())

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        return []

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log_file.close()


@contextlib.contextmanager
def running(tmp: Path, services: str, **kw: Any) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp, services, **kw)
    try:
        d.wait_socket()
        yield d
    finally:
        d.close()


def zombies(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return out
