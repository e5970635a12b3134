"""Service definitions, read with supervisor's own config parser.

``supervisord/codetainer.conf`` stays a valid supervisord file (a test starts stock
supervisord on it). We take supervisor's ``ProcessConfig`` and copy the fields we
implement into a frozen dataclass, so the rest of the daemon never touches supervisor's
objects and comparing two configs (for reload) is plain equality.
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ServiceConfigError(Exception):
    """The services file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    command: tuple[str, ...]
    priority: int = 999
    autostart: bool = True
    autorestart: str = "unexpected"  # "true" | "false" | "unexpected"
    exitcodes: tuple[int, ...] = (0,)
    startsecs: float = 1.0
    startretries: int = 3
    stopsignal: int = signal.SIGTERM
    stopwaitsecs: float = 10.0
    stopasgroup: bool = False
    killasgroup: bool = False
    uid: int | None = None
    directory: str | None = None
    umask: int | None = None
    environment: tuple[tuple[str, str], ...] = ()
    redirect_stderr: bool = False

    @property
    def env(self) -> dict[str, str]:
        return dict(self.environment)


def _autorestart(value: Any) -> str:
    if value is False:
        return "false"
    if value is True:
        return "true"
    # supervisor.datatypes.RestartWhenExitUnexpected / RestartUnconditionally classes
    name = getattr(value, "__name__", str(value))
    return "true" if name == "RestartUnconditionally" else "unexpected"


def load_services(path: str | Path) -> list[ServiceConfig]:
    """Parse a supervisord-format file into service configs, sorted by priority."""
    from supervisor.options import ServerOptions  # heavy: import only when loading

    path = Path(path)
    if not path.is_file():
        raise ServiceConfigError(
            f"services file {path} does not exist: create it or pass --services PATH"
        )
    opts = ServerOptions()
    opts.configfile = str(path)
    opts.here = str(path.parent.resolve())
    try:
        section = opts.read_config(str(path))
    except (ValueError, OSError) as exc:
        raise ServiceConfigError(f"{path}: {exc}") from None
    services: list[ServiceConfig] = []
    for group in section.process_group_configs:
        for pc in group.process_configs:
            try:
                argv = tuple(shlex.split(pc.command))
            except ValueError as exc:
                raise ServiceConfigError(
                    f"{path}: [program:{pc.name}] command cannot be parsed: {exc}") from None
            if not argv:
                raise ServiceConfigError(f"{path}: [program:{pc.name}] has an empty command")
            services.append(
                ServiceConfig(
                    name=pc.name,
                    command=argv,
                    priority=int(pc.priority),
                    autostart=bool(pc.autostart),
                    autorestart=_autorestart(pc.autorestart),
                    exitcodes=tuple(int(c) for c in pc.exitcodes),
                    startsecs=float(pc.startsecs),
                    startretries=int(pc.startretries),
                    stopsignal=int(pc.stopsignal),
                    stopwaitsecs=float(pc.stopwaitsecs),
                    stopasgroup=bool(pc.stopasgroup),
                    killasgroup=bool(pc.killasgroup or pc.stopasgroup),
                    uid=pc.uid,
                    directory=pc.directory,
                    umask=pc.umask,
                    environment=tuple(sorted((pc.environment or {}).items())),
                    redirect_stderr=bool(pc.redirect_stderr),
                )
            )
    names = [s.name for s in services]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ServiceConfigError(f"{path}: duplicate program names {sorted(dupes)}")
    services.sort(key=lambda s: (s.priority, s.name))
    return services


def user_identity(uid: int) -> tuple[int, int, list[int], dict[str, str]]:
    """(uid, gid, supplementary groups, HOME/USER/LOGNAME) for ``user=`` programs."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return uid, uid, [], {}
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}
    return pw.pw_uid, pw.pw_gid, groups, env
