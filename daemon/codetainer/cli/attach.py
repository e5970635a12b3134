"""``codetainer attach`` (also ``attach-claude``): put the operator in the agent's session.

Root's shell profile in the image ends with ``exec codetainer attach``, so this is what
``fly ssh console`` runs. The cases, each tested through a pseudo-terminal:

* session up: ``exec tmux -S SOCK attach-session -t $ID ; select-pane -t %AGENT`` at once,
  as the agent user on a relayed pseudo-terminal when run as root (``dropped_attach``);
* boot in progress: stream the daemon's ``wait`` op, print every step as it starts and
  finishes (a spinner only on a capable terminal), attach the moment the session exists;
  Ctrl-C drops to a login shell;
* boot FAILED or the session cannot start: print what failed and the fix, then exec a
  login shell so the SSH session stays usable;
* daemon unreachable: say so, exec a login shell;
* stdin not a terminal: print the status and exit non-zero (never wait, never hang).

The fallback shell gets ``CODETAINER_NO_ATTACH=1`` so a profile that runs ``exec
codetainer attach`` must skip it when that is set (otherwise the shell would loop back
here). Start-up time is the attach latency (bench/bench_fastpaths.py): with the session
up only the control client (``json``, ``socket``), ``shlex`` and ``boot/chain.py``
(``os``) are imported; the daemon's ``session`` reply carries what the privilege drop needs (the
agent's uid, limits and compiled seccomp filter). ``typing`` is not imported at run time
either (its import is a tenth of a bare interpreter's start).

Exit codes (only when nothing was exec'd): 2 no terminal, 69 daemon unreachable and no
terminal, 1 neither tmux nor a shell could be started.
"""

from __future__ import annotations

import os
import sys
import time

from codetainer.cli.inert import inert

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any, NoReturn, TextIO

    from codetainer.status import StepStatus

NO_TTY = 2
UNREACHABLE = 69
EXEC_FAILED = 1

#: How long to wait for the session after boot finished READY/DEGRADED.
SESSION_DEADLINE_S = 60.0
NO_ATTACH_VAR = "CODETAINER_NO_ATTACH"

_USAGE = """usage: codetainer attach [--socket PATH]

Attach to the agent's tmux session; while the machine boots, show its progress.
If boot failed or the daemon is unreachable, explain why and open a login shell.
"""


def _say(text: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(text + "\n")
    out.flush()


# -- exec targets --------------------------------------------------------------------------


def tmux_attach_argv(info: dict[str, Any]) -> list[str]:
    from codetainer.boot import chain

    return chain.tmux_attach_argv(os.environ.get("CODETAINER_TMUX") or "tmux", str(info["socket"]),
                                  str(info["id"]), str(info.get("agent_pane") or "") or None)


#: What the tmux client may carry into the agent's server (a client hands its whole
#: environment to the server): the terminal's description, never root's variables.
CLIENT_ENV = ("TERM", "COLORTERM", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
SCRIPT = "/usr/bin/script"


class UnsafeAttach(Exception):
    """Attaching as root cannot be done without giving the agent a root client."""


def dropped_attach(info: dict[str, Any], environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment that attach root's terminal to the agent's session safely,
    and leave root's login shell after a detach.

    The tmux server is the agent's, and a server can make its client run a program
    (``detach-client -E``), so the client runs as the agent (the agent's own privilege
    drop: no_new_privs, empty bounding set). It does not get root's terminal either: it
    runs on a fresh pseudo-terminal that ``script`` (util-linux, running as root) relays
    to ours, as ``sudo``'s use_pty does. A client on the operator's own terminal, which is
    the controlling terminal of root's login shell, could be ptraced by the agent (same
    uid) and made to push keystrokes into that shell with TIOCSTI.
    """

    from codetainer.boot import chain

    uid, gid = info.get("uid"), info.get("gid")
    if not isinstance(uid, int) or not isinstance(gid, int) or uid <= 0 or gid <= 0 or \
            isinstance(uid, bool) or isinstance(gid, bool):
        raise UnsafeAttach(f"the daemon did not name the agent's uid (got {uid!r}); "
                           "refusing to attach as root to a server that uid may control")
    if not os.access(SCRIPT, os.X_OK):
        raise UnsafeAttach(f"{SCRIPT} (util-linux) is missing: it keeps root's terminal "
                           "away from the agent's tmux client; install bsdutils")
    try:  # the client is the agent's too: its limits, its cgroup (a server can make it exec)
        limits = chain.checked_limits(info.get("limits"))
        filter_hex = client_filter(info)
    except ValueError as exc:
        raise UnsafeAttach(str(exc)) from None
    oom, nice, nproc, procs = limits or (chain.OOM_SCORE_ADJ, chain.NICE, chain.NPROC, ())
    inner = chain.agent_script(uid, gid, tmux_attach_argv(info), filter_hex=filter_hex,
                               oom_score_adj=oom, nice=nice, nproc=nproc, cgroup_procs=procs)
    env = {k: environ[k] for k in CLIENT_ENV if k in environ}
    home = str(info.get("home") or "/")
    env.update(PATH=environ.get("PATH") or "/usr/bin:/bin", SHELL="/bin/sh", HOME=home)
    # -q no banner, -e the client's exit status, -f no buffering; the typescript is discarded.
    # script runs its command with ``sh -c`` (SHELL): that shell runs the chain's prologue.
    relay = [SCRIPT, "-q", "-e", "-f", "-c", inner, "/dev/null"]
    # A small sh, not this Python, stays behind while attached: it runs the relay with
    # only ``env``, then (C-b d, or the session went away) hands the terminal to root's
    # login shell with root's own environment, as a shell with attach switched off.
    shell = next((sh for sh in (environ.get("SHELL") or "", "/bin/bash", "/bin/sh")
                  if sh and os.access(sh, os.X_OK)), "/bin/sh")
    then = ('env -i "$@"; export CODETAINER_NO_ATTACH=1; '
            "echo 'codetainer: detached; `codetainer attach` goes back'; exec \"$0\" -l")
    argv = ["/bin/sh", "-c", then, shell, *(f"{k}={v}" for k, v in env.items()), *relay]
    return argv, dict(environ)


def client_filter(info: dict[str, Any]) -> str:
    """The agent's seccomp filter for root's client: the one the daemon's ``session``
    reply hands over (checked), else (a ``session.ready`` event, an older daemon) compiled
    here, which costs this process libseccomp's import. Raises ValueError or UnsafeAttach."""
    from codetainer.boot import chain

    if info.get("seccomp_filter") is not None:
        return chain.checked_filter(info["seccomp_filter"])
    from codetainer.boot.seccomp import SeccompUnavailable, filter_hex

    try:
        return filter_hex()
    except SeccompUnavailable as exc:
        raise UnsafeAttach(str(exc)) from None


_TERMINFO_DIRS = ("/etc/terminfo", "/lib/terminfo", "/usr/share/terminfo", "/usr/lib/terminfo")


def _known_terminal(term: str) -> bool:
    """Is there a terminfo entry for ``term``? (tmux refuses to attach without one.)"""
    if not term or "/" in term:
        return False
    dirs = [os.path.expanduser("~/.terminfo"), *_TERMINFO_DIRS]
    extra = os.environ.get("TERMINFO")
    if extra:
        dirs.insert(0, extra)
    for d in dirs:
        for sub in (term[0], f"{ord(term[0]):x}"):
            if os.path.exists(os.path.join(d, sub, term)):
                return True
    return False


def _attach_or_explain(info: dict[str, Any] | None) -> None:
    """Attach when the session exists (does not return); explain and leave a shell when
    it failed; return otherwise (not up yet)."""
    if info and info.get("exists"):
        exec_tmux(info)
    if info and info.get("state") == "FAILED":
        from codetainer.cli.render import session_failure

        _failed([session_failure(inert(info))], "the agent session could not start")


def exec_tmux(info: dict[str, Any]) -> NoReturn:
    os.environ.pop("TMUX", None)  # we are not nesting: attach even from inside tmux
    term = os.environ.get("TERM", "")
    if not _known_terminal(term):
        # An exotic $TERM (xterm-kitty, ...) would make tmux exit and close the SSH session.
        _say(f"codetainer: terminal type {term!r} is unknown here; using xterm-256color")
        os.environ["TERM"] = "xterm-256color"
    if os.geteuid() == 0:
        try:
            argv, env = dropped_attach(info, dict(os.environ))
        except UnsafeAttach as exc:
            _say(f"codetainer: not attaching: {exc}")
            exec_shell()
    else:  # nothing to lose: the agent user itself, or a test
        argv, env = tmux_attach_argv(info), dict(os.environ)
    sys.stdout.flush()
    try:
        os.execvpe(argv[0], argv, env)  # noqa: S606 - argv, no shell, on purpose
    except OSError as exc:
        _say(f"codetainer: cannot run {argv[0]}: {exc.strerror}")
        exec_shell()


def exec_shell() -> NoReturn:
    """Replace this process with a login shell (the SSH session stays usable)."""
    os.environ[NO_ATTACH_VAR] = "1"
    candidates = [os.environ.get("SHELL") or "", "/bin/bash", "/bin/sh"]
    sys.stdout.flush()
    for shell in candidates:
        if shell and os.access(shell, os.X_OK):
            try:
                os.execv(shell, [shell, "-l"])  # noqa: S606
            except OSError:
                continue
    _say("codetainer: no shell could be started (tried $SHELL, /bin/bash, /bin/sh)")
    os._exit(EXEC_FAILED)


# -- progress ------------------------------------------------------------------------------


class Progress:
    """Prints boot steps live (``render.progress_line``). With ``spinner`` one line
    animates while a step runs."""

    def __init__(self, out: TextIO, spinner: bool) -> None:
        import threading  # the boot path only

        from codetainer.cli import render

        self.out = out
        self.spinner = spinner
        self._render = render
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}  # step name -> monotonic start
        self._final: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        utf8 = (getattr(out, "encoding", "") or "").lower().replace("-", "") == "utf8"
        self._frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if utf8 else "|/-\\"
        if spinner:
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _clear(self) -> None:
        if self.spinner:
            self._write("\r\x1b[K")

    def line(self, text: str) -> None:
        with self._lock:
            self._clear()
            self._write(text + "\n")

    def step(self, event: dict[str, Any]) -> None:
        ev: StepStatus = inert(event)  # a reason can quote what the agent named (docs/security.md)
        name = str(ev.get("name", "?"))
        state = str(ev.get("state", ""))
        with self._lock:
            if state == "RUNNING":
                if name in self._running or name in self._final:
                    return
                self._running[name] = time.monotonic()
                if not self.spinner:
                    self._write(self._render.progress_line(ev) + "\n")
            elif state in self._render.FINAL:
                if name in self._final:
                    return
                self._final.add(name)
                self._running.pop(name, None)
                self._clear()
                self._write(self._render.progress_line(ev) + "\n")

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.1):
            with self._lock:
                if not self._running:
                    continue
                name, t0 = next(reversed(self._running.items()))
                frame = self._frames[i % len(self._frames)]
                self._write(f"\r\x1b[K{frame} {name} {time.monotonic() - t0:.1f}s")
                i += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        with self._lock:
            self._clear()


def _spinner_capable() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM", "dumb") not in ("", "dumb")


# -- status (no terminal) ------------------------------------------------------------------


def _print_status(path: str) -> None:
    from codetainer.cli.render import render_brief
    from codetainer.control.client import DaemonUnreachable, RequestFailed, call

    status: dict[str, Any] | None = None
    session: dict[str, Any] | None = None
    try:
        status = call("status", path, timeout=3.0)
    except (DaemonUnreachable, RequestFailed):
        pass
    if status is None:
        try:
            session = call("session", path, timeout=3.0)
        except (DaemonUnreachable, RequestFailed):
            pass
    text = render_brief(inert(status), inert(session))
    if text:
        _say(text)


# -- main flow -----------------------------------------------------------------------------


def _failed(reasons: list[str], headline: str) -> NoReturn:
    _say(f"codetainer: {headline}")
    for r in reasons:
        _say(f"  - {r}")
    _say("codetainer: opening a shell; `codetainer status` shows details, "
         "`codetainer attach` tries again.")
    exec_shell()


def _await_session(path: str) -> NoReturn:
    """Boot finished READY/DEGRADED: the session follows shortly; poll for it."""
    from codetainer.control.client import DaemonUnreachable, RequestFailed, call

    deadline = time.monotonic() + SESSION_DEADLINE_S
    while True:
        try:
            info = call("session", path, timeout=3.0)
        except DaemonUnreachable as exc:
            _failed([exc.why], f"lost the daemon at {exc.path} while waiting for the session")
        except RequestFailed as exc:
            _failed([exc.message], "the daemon could not report the session")
        _attach_or_explain(info)
        if time.monotonic() >= deadline:
            _failed([str((info or {}).get("reason") or "no session yet")],
                     f"the agent session did not appear within {SESSION_DEADLINE_S:g}s")
        time.sleep(0.1)


def _follow_boot(path: str) -> NoReturn:
    from codetainer.control.client import Client, DaemonUnreachable, RequestFailed

    progress = Progress(sys.stdout, _spinner_capable())
    progress.line("codetainer: boot progress (Ctrl-C for a shell):")
    result: dict[str, Any] = {}
    try:
        with Client(path, timeout=None) as client:
            for msg in client.stream("wait"):
                if "__result__" in msg:
                    result = msg["__result__"] or {}
                    break
                name = msg.get("event")
                if name == "boot.step":
                    progress.step(msg)
                elif name == "session.ready" and msg.get("exists", True):
                    progress.close()
                    exec_tmux(msg)
                elif name == "session.failed":
                    progress.close()
                    from codetainer.cli.render import session_failure

                    _failed([session_failure(inert(msg))], "the agent session could not start")
    except KeyboardInterrupt:
        progress.close()
        _say("\ncodetainer: interrupted; opening a shell (`codetainer attach` to come back)")
        exec_shell()
    except DaemonUnreachable as exc:
        progress.close()
        _failed([exc.why], f"lost the daemon at {exc.path} during boot")
    except RequestFailed as exc:
        progress.close()
        _failed([exc.message], "the daemon refused to report boot progress")
    progress.close()
    state = str(result.get("state", "?"))
    reasons = [str(r) for r in result.get("reasons") or []]
    if state == "FAILED":
        _failed(reasons, "boot FAILED; the agent was not started:")
    if state == "DEGRADED":
        _say("codetainer: boot finished DEGRADED:")
        for r in reasons:
            _say(f"  - {r}")
    try:
        _await_session(path)
    except KeyboardInterrupt:
        _say("\ncodetainer: interrupted; opening a shell (`codetainer attach` to come back)")
        exec_shell()


def _parse(argv: list[str]) -> str | None:
    socket: str | None = None
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            _say(_USAGE.rstrip())
            raise SystemExit(0)
        if arg == "--socket":
            socket = next(it, None)
            if socket is None:
                raise SystemExit("codetainer attach: --socket needs a path")
        elif arg.startswith("--socket="):
            socket = arg.split("=", 1)[1]
        else:
            raise SystemExit(f"codetainer attach: unknown argument {arg!r}\n{_USAGE}")
    return socket


def _first_contact(path: str, interactive: bool) -> dict[str, Any] | None:
    """Ask for the session; on a terminal, give a daemon that is still starting a moment.

    ``fly ssh console`` can land while the machine is booting, before the control socket
    exists: wait up to ``CODETAINER_ATTACH_WAIT`` seconds (default 15) for it.
    """
    from codetainer.control.client import DaemonUnreachable, call

    deadline = time.monotonic() + (float(os.environ.get("CODETAINER_ATTACH_WAIT", "15"))
                                   if interactive else 0.0)
    said = False
    while True:
        try:
            result: dict[str, Any] | None = call("session", path, timeout=3.0)
            return result
        except DaemonUnreachable:
            if time.monotonic() >= deadline:
                raise
            if not said:
                _say(f"codetainer: waiting for codetainerd to start ({path})...")
                said = True
            try:
                time.sleep(0.1)
            except KeyboardInterrupt:
                raise DaemonUnreachable(path, "interrupted while waiting") from None


def run(argv: list[str] | None = None, socket: str | None = None) -> int:
    """Entry point. Returns only when nothing was exec'd (see the module's exit codes)."""
    from codetainer.control.client import DaemonUnreachable, RequestFailed, socket_path

    path = socket_path(_parse(list(sys.argv[1:] if argv is None else argv)) or socket)
    interactive = sys.stdin.isatty()
    try:
        info: dict[str, Any] | None = _first_contact(path, interactive)
    except DaemonUnreachable as exc:
        _say(f"codetainer: {exc}")
        if not interactive:
            return UNREACHABLE
        _say("codetainer: the agent session is managed by codetainerd; check `fly logs`. "
             "Opening a shell.")
        exec_shell()
    except RequestFailed:
        info = None  # an older daemon without the op: follow boot instead
    if not interactive:
        _say("codetainer: stdin is not a terminal; not attaching. Status:")
        _print_status(path)
        return NO_TTY
    _attach_or_explain(info)
    _follow_boot(path)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], None))
