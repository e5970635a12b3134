"""Service definitions, read with supervisor's own config parser.

``supervisord/codetainer.conf`` stays a valid supervisord file (a test starts stock
supervisord on it). We take supervisor's ``ProcessConfig`` and copy the fields we
implement into a frozen dataclass, so the rest of the daemon never touches supervisor's
objects and comparing two configs (for reload) is plain equality.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn


class ServiceConfigError(Exception):
    """The services file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ExponentialBackoff:
    """A BACKOFF other than supervisord's (which waits one second more per failed start and
    restarts at once after a run): ``first * 2**(n-1)`` seconds, at most ``cap``, after the
    n-th failed start in a row (``codetainer.backoff``'s one curve); and an exit after a run
    that reached RUNNING is the first of a new series, restarted after ``first``, so a
    program that keeps exiting never restarts in a tight loop. The agent pane's policy
    (``session/panepolicy.py``); services keep supervisord's."""

    first: float
    cap: float

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` exits in a row before the next start."""
        from codetainer import backoff  # tenacity: only for a program that backs off so

        return backoff.delay(failures, self.first, self.cap)


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
    #: None: supervisord's BACKOFF (see :class:`ExponentialBackoff` for the other one)
    backoff: ExponentialBackoff | None = None

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
    """Parse a supervisord-format file into service configs, sorted by priority.

    supervisor's parser is imported and run in a forked child, which sends the configs
    back pickled: its imports (xmlrpc, http, email, medusa, decimal: ~6 MiB and ~50 ms)
    stay out of the long-lived daemon, which keeps only the frozen configs. A child
    :func:`prefetch` started for the same path is the one asked. Without ``fork`` (or a
    pipe) the parse runs here."""
    path = Path(path)
    child = _PREFETCHED.pop(path, None)
    while _PREFETCHED:  # started for a path the caller did not ask for: let them go
        _PREFETCHED.popitem()[1].discard()
    try:
        return (child or _Child(path)).result()
    except _NoChild:
        return _parse(path)


def prefetch(path: str | Path) -> None:
    """Start the parse of ``path`` now, in its child, for the first :func:`load_services`
    of it (the daemon's entrypoint: the child parses while the daemon imports)."""
    path = Path(path)
    if path not in _PREFETCHED:
        with contextlib.suppress(_NoChild):
            _PREFETCHED[path] = _Child(path)


class _NoChild(Exception):
    """No child could be had: parse in this process."""


class _Child:
    """A forked child parsing one file; :meth:`result` is its answer (once)."""

    def __init__(self, path: Path) -> None:
        try:
            self.rfd, wfd = os.pipe()
            self.pid = os.fork()
        except OSError as exc:
            raise _NoChild from exc
        if self.pid == 0:
            _answer(path, self.rfd, wfd)  # never returns
        os.close(wfd)

    def result(self) -> list[ServiceConfig]:
        import pickle

        with os.fdopen(self.rfd, "rb") as answer_in:
            data = answer_in.read()
        os.waitpid(self.pid, 0)
        if not data:
            raise _NoChild  # the child died before it answered: parse here, for its error
        kind, value = pickle.loads(data)  # noqa: S301 - our own child's answer
        if kind == "error":
            raise value
        configs: list[ServiceConfig] = value
        return configs

    def discard(self) -> None:
        """Unasked: close the pipe (a child still writing gets EPIPE and exits), reap it."""
        os.close(self.rfd)
        os.waitpid(self.pid, 0)


#: children started by :func:`prefetch`, by path, until :func:`load_services` asks
_PREFETCHED: dict[Path, _Child] = {}


def _answer(path: Path, rfd: int, wfd: int) -> NoReturn:
    """The child: parse, answer, exit; never back into the caller's code."""
    import pickle

    status = 0
    try:
        os.close(rfd)
        # a signal meant for the daemon's group must not run the parent's handlers
        # (asyncio's wakeup fd is shared): the child ignores all, then exits
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            answer: tuple[str, Any] = ("ok", _parse(path))
        except Exception as exc:  # handed to the parent, which raises it
            answer = ("error", exc)
        try:
            data = pickle.dumps(answer)
        except Exception as exc:  # an exception that cannot be pickled
            data = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        with os.fdopen(wfd, "wb") as out:
            out.write(data)
    except BaseException:  # nothing may escape a forked child
        status = 1
    finally:
        os._exit(status)


def _parse(path: Path) -> list[ServiceConfig]:
    from supervisor.options import ServerOptions  # heavy: import only when loading

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
