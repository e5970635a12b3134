"""``codetainerd``: the entrypoint. A tiny synchronous init around the asyncio daemon.

The shape tini and dumb-init take. The process that starts (PID 1 under Docker, or a
child of Fly's init, where it makes itself a child subreaper) forks *before importing
anything heavy*. The parent stays a small synchronous loop: it blocks the signals it
cares about and takes them one at a time with ``sigwaitinfo``; SIGCHLD means "reap
everything" (``waitpid(-1)`` is safe here, because this process runs nothing else);
every other signal is forwarded to the daemon child. When the daemon exits, the init
kills what is left of the tree, reaps it, and exits with the daemon's status.

The child runs the asyncio daemon, which waits only for its own children, by pid, so
no exit status is ever stolen (the pitfall described in DESIGN.md).

Only the standard library's ``os``, ``_signal`` (``signal`` without its enums) and ``sys``
are imported at module level.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the init stays small)
if TYPE_CHECKING:
    import signal
    from typing import NoReturn
else:
    # signal's C half: the same functions and numbers, without signal.py's enums (enum,
    # functools, collections: ~0.9 MiB the init would keep)
    import _signal as signal

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
WAITED = (*FORWARDED, signal.SIGCHLD)


def _prctl(option: int, arg: int) -> bool:
    import ctypes  # only when needed: keeps the PID-1 init small

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0)) == 0


def _noop(signum: int, frame: object) -> None:
    """Explicit handler: as PID 1 the kernel drops signals whose disposition is SIG_DFL."""


def _exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 1


def _reap() -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


def _orphans(me: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ... ; comm may contain spaces and parens
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            pids.append(int(entry))
    return pids


def _sweep(is_pid1: bool) -> None:
    """Kill and reap whatever outlived the daemon (orphans re-parented to us)."""
    me = os.getpid()
    for _ in range(100):  # bounded: at most ~5 s
        if is_pid1:
            # In our own PID namespace, -1 means "every process but us".
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for pid in _orphans(me):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _reap()
        try:
            if os.waitpid(-1, os.WNOHANG) != (0, 0):
                continue
        except ChildProcessError:
            return  # no children left
        signal.sigtimedwait([signal.SIGCHLD], 0.05)


#: optional imports of the daemon's libraries that it never uses, kept out of its memory
#: (idle RSS, issue 10): ``ssl`` for asyncio (~5 MiB of libssl/libcrypto; the daemon speaks
#: no TLS itself: asyncio then refuses a TLS transport, "stdlib ssl module not available";
#: its HTTP(S) requests run in a child interpreter, ``httpget.py``) and
#: ``tornado`` for tenacity (its Tornado retrying; mitmproxy installs tornado in the venv),
#: and OpenSSL's ``_hashlib`` for hashlib and hmac (~3.5 MiB; dnspython imports them for
#: query ids and TSIG, the daemon hashes only with sha256, which hashlib then takes from
#: Python's own ``_sha256``; hmac works on hashlib)
LEAN_IMPORTS = (("asyncio", "ssl"), ("tenacity", "tornado"), ("hashlib", "_hashlib"),
                ("hmac", "_hashlib"))


def _lean_imports() -> None:
    """Import each library with its unused optional import failing, then undo the block,
    so a later ``import`` of that module elsewhere finds the real one."""
    import importlib

    for name, optional in LEAN_IMPORTS:
        if name in sys.modules or optional in sys.modules:
            continue
        sys.modules[optional] = None  # type: ignore[assignment]  # "import ssl" raises ImportError
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the daemon's own import says it better
        finally:
            del sys.modules[optional]


def _run_daemon(argv: list[str]) -> NoReturn:
    code = 1
    try:
        from codetainer.heap import defer_collections

        defer_collections()  # until settle_heap, after the boot: the imports' objects stay
        _lean_imports()
        from codetainer.init.cmdline import read_command
        from codetainer.services.config import prefetch

        command = read_command(argv)  # a bad one exits 64 here, before any heavy import
        # the services file's parse (a forked child) runs beside the daemon's imports
        prefetch(command.settings.services_file)
        # codetainer.limits: the OOM killer takes the agent first, the daemon last but
        # for the init (only root may lower it; status shows what each process has)
        from codetainer.limits import DAEMON_OOM_SCORE_ADJ, set_oom_score_adj

        set_oom_score_adj(DAEMON_OOM_SCORE_ADJ)
        if command.steps is None or "network-config" in command.steps:
            # the firewall's nftables probe too, whose commit waits on the kernel (~15
            # ms): network-config takes its answer
            from codetainer.network.nftprobe import start_early

            start_early(command.settings.firewall, nat=command.settings.proxy)
        from codetainer.daemon import main as daemon_main

        code = daemon_main(command)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    # Non-dumpable, before the secrets are read, inherited by the daemon (fork keeps it,
    # every exec of a child resets it): no core file of the init or the daemon holds
    # them, and no process without CAP_SYS_PTRACE may ptrace or read their memory.
    if not _prctl(PR_SET_DUMPABLE, 0):
        sys.stderr.write("codetainerd: cannot make the daemon non-dumpable (prctl "
                         "PR_SET_DUMPABLE); a core dump of it could hold the secrets\n")
    if os.environ.get("CODETAINER_INIT", "1") == "0" or "-h" in argv or "--help" in argv:
        # No init wanted (or just --help): run the daemon in this process.
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _run_daemon(argv)
    is_pid1 = os.getpid() == 1
    from codetainer.limits import INIT_OOM_SCORE_ADJ, set_oom_score_adj

    set_oom_score_adj(INIT_OOM_SCORE_ADJ)  # the daemon inherits it, then raises its own
    if not is_pid1 and not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        sys.stderr.write("codetainerd: cannot become a child subreaper; orphans will not be "
                         "reaped by us\n")
    for sig in WAITED:
        signal.signal(sig, _noop)
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    child = os.fork()
    if child == 0:
        # The daemon: own process group (a terminal's ^C reaches it only through us),
        # clean signal state, and it dies if the init is ever gone.
        os.setpgid(0, 0)
        for sig in WAITED:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if not is_pid1:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _run_daemon(argv)

    # The daemon has its own copy of the environment; the init keeps no secret, not even
    # in the environment block /proc/1/environ shows.
    from codetainer.init.environ import SECRET_NAMES, scrub_process_environ

    for name in SECRET_NAMES:
        os.environ.pop(name, None)
    scrub_process_environ(SECRET_NAMES)

    status: int | None = None
    while status is None:
        info = signal.sigwaitinfo(WAITED)
        if info.si_signo == signal.SIGCHLD:
            for pid, st in _reap():
                if pid == child:
                    status = st
        else:
            try:
                os.kill(child, info.si_signo)
            except ProcessLookupError:
                pass
    _sweep(is_pid1)
    os._exit(_exit_code(status))


if __name__ == "__main__":
    main()
