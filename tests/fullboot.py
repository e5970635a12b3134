"""The whole codetainer, booted for real: test world + scratch root + codetainerd as PID 1.

Shared by the end-to-end tests, the boot benchmark and ``./dev sandbox``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from codetainer.control.client import Client, DaemonUnreachable
from codetainer.network.allowlist import load_allowlist

from tests.scratchroot import DEFAULT_ENV, OUT, ScratchRoot, Spawned
from tests.world import ALLOWED_HOSTS, UPSTREAM, World

ROOT = Path(__file__).resolve().parents[1]
CODETAINERD = str(Path(sys.executable).parent / "codetainerd")


def default_names() -> list[str]:
    """Every exact name of the shipped allowlist, plus one name under each wildcard."""
    allow = load_allowlist(ROOT / "network" / "domains.conf")
    return sorted({*allow.names, *(f"www.{w}" for w in allow.wildcards)})


def publish_names(world: World, names: list[str]) -> dict[str, str]:
    """Make the world's DNS answer each name with a world host (one SIGHUP in all)."""
    mapping = {n: ALLOWED_HOSTS[i % len(ALLOWED_HOSTS)] for i, n in enumerate(names)}
    for name in names[:-1]:
        world.records[name] = [mapping[name]]
    world.set_records(names[-1], [mapping[names[-1]]])
    return mapping


class FullBoot:
    def __init__(self, world: World, base: Path, env: Mapping[str, str] | None = None,
                 steps: str = "", binds: tuple[tuple[str, str, bool], ...] = (),
                 services: str | None = None) -> None:
        self.world = world
        self.root = ScratchRoot(base, netns=world.inner, binds=binds)
        conf = services if services is not None else \
            (ROOT / "supervisord" / "codetainer.conf").read_text()
        (self.root.out / "services.conf").write_text(conf)
        self.socket = str(self.root.out / "control.sock")
        self.log_path = base / "daemon.log"
        argv = [CODETAINERD, "--services", f"{OUT}/services.conf", "--socket",
                f"{OUT}/control.sock"]
        if steps:
            argv += ["--steps", steps]
        self.env = {**DEFAULT_ENV, "CODETAINER_LOG_FORMAT": "json", "FLY_APP_NAME": "sandbox",
                    "GH_PAT": "ghp_SANDBOXnotARealToken0000", "CLAUDE_CODE_OAUTH_TOKEN":
                    "sk-ant-oat01-SANDBOXfake", "CODETAINER_UPSTREAMS": UPSTREAM,
                    "CODETAINER_AGENT_COMMAND": "bash -l", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.t0 = time.monotonic()
        self.proc: Spawned = self.root.spawn(argv, env=self.env, stdout=self._log,
                                             stderr=subprocess.STDOUT)

    def call(self, op: str, **args: Any) -> Any:
        with Client(self.socket, timeout=10) as c:
            return c.call(op, **args)

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.call("status")
        return st

    def wait_boot(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise AssertionError(f"codetainerd exited {self.proc.popen.returncode}:\n"
                                     f"{self.log()[-4000:]}")
            with contextlib.suppress(DaemonUnreachable, OSError):
                last = self.status()
                if last["state"] != "BOOTING":
                    return dict(last)
            time.sleep(0.01)
        raise AssertionError(f"boot did not finish in {timeout}s; last {last}\n{self.log()[-4000:]}")

    def inside(self, *argv: str, env: Mapping[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        return self.proc.nsenter(list(argv), env=env)

    def nsenter_argv(self, *argv: str, env: Mapping[str, str] | None = None) -> list[str]:
        return ["nsenter", f"--target={self.proc.pid}", "--mount", "--pid", "--net", "--uts",
                "--root", "--wd", "--", "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in {**DEFAULT_ENV, **(env or {})}.items()), *argv]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.popen.poll() is None:
            self.proc.signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc.popen.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def full_boot(env: Mapping[str, str] | None = None, steps: str = "",
              binds: tuple[tuple[str, str, bool], ...] = (), world: World | None = None,
              base: Path | None = None) -> Iterator[FullBoot]:
    with contextlib.ExitStack() as stack:
        if world is None:
            world = stack.enter_context(World(ttl=60))
            publish_names(world, default_names())
        if base is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ct-boot-")))
            os.chmod(base, 0o755)
        fb = FullBoot(world, base, env=env, steps=steps, binds=binds)
        try:
            yield fb
        finally:
            fb.close()
