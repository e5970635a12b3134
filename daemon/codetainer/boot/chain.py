"""The exec chain every agent process starts through, rendered from plain values.

``privileges.setpriv_argv`` (the daemon's agent processes and tmux clients) and
``codetainer attach`` (root's tmux client) render the same chain with :func:`agent_argv`.
This module imports nothing but ``os`` and ``sys``, so ``attach`` renders it without the
daemon's helpers or libseccomp: the daemon hands it the compiled filter
(:func:`checked_filter`) and the limits (:func:`checked_limits`) in its ``session``
reply. Why each link is where it is: ``boot/privileges.py``; the filter:
``boot/seccomp.py``. The chain::

    /bin/sh -c JOIN  oom_score_adj, then into the agent's cgroup(s)     (as root)
    setpriv ...                                                         (the drop)
    codetainer-seccomp HEX --nproc=N --core=0 --nice=N --               (as the agent)
    argv

(``codetainer-seccomp`` is :data:`LOADER` in C, where it is built: :func:`loader_argv`.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: ``sh -c`` prologue, run as root: $1 the oom_score_adj, then cgroup.procs files up to
#: ``--``, then the rest of the chain. Any failure stops the launch (fail closed, 126).
JOIN = ('echo "$1" >/proc/self/oom_score_adj || exit 126; shift; '
        'while [ "$1" != -- ]; do echo $$ >"$1" || exit 126; shift; done; shift; exec "$@"')
JOIN_NAME = "codetainer-limits"  # $0: names the prologue in its error messages

#: Defaults of :class:`privileges.ExecLimits` (the limits of a chain the daemon did not
#: describe): first in line for the OOM killer, nice 10, 4,096 tasks of the agent's uid.
OOM_SCORE_ADJ = 1000
NICE = 10
NPROC = 4096

#: Run as the agent, as ``python3 -I -S -c LOADER HEX [--nproc=N] [--core=N] [--nice=N]
#: -- argv...``: the process's own limits (hard limits too, so they cannot be raised
#: again; the kernel checks RLIMIT_NPROC against the process's *own* limit at setresuid,
#: so it is set after the drop, as the agent, privileges.py), its nice value (raising it
#: needs no privilege, lowering it does), then the seccomp filter (boot/seccomp.py), then
#: exec. Only ``ctypes`` and ``resource``, so it starts in the time of a bare
#: interpreter. Numbers: PR_SET_NO_NEW_PRIVS 38, PR_SET_SECCOMP 22, SECCOMP_MODE_FILTER 2
#: / SECCOMP_SET_MODE_FILTER 1 with SECCOMP_FILTER_FLAG_SPEC_ALLOW 4 (a filter alone does
#: not switch the tree's CPU speculation mitigations, which kernels before 5.16 did by
#: default); seccomp(2) is 317 on x86-64 and 277 on arm64, elsewhere (or on a kernel
#: without the flag) prctl. Any failure: 126 (127: no such program), nothing runs.
LOADER = r"""
import ctypes, os, resource, sys
def fail(what, code):
    sys.stderr.write("codetainer-seccomp: " + what + "\n")
    os._exit(code)
args = sys.argv[1:]
end = args.index("--") if "--" in args else -1
if end < 1 or end == len(args) - 1:
    fail("usage: HEX [--nproc=N] [--core=N] [--nice=N] -- PROGRAM [ARG...]", 126)
try:
    bpf = bytes.fromhex(args[0])
except ValueError:
    fail("the filter is not hex", 126)
limits = {"--nproc": resource.RLIMIT_NPROC, "--core": resource.RLIMIT_CORE}
for opt in args[1:end]:
    name, _, value = opt.partition("=")
    if (name not in limits and name != "--nice") or not value.isdigit():
        fail("unknown option " + opt, 126)
    try:
        if name == "--nice":
            os.nice(int(value))
        else:
            resource.setrlimit(limits[name], (int(value), int(value)))
    except (OSError, ValueError, OverflowError) as exc:
        fail("cannot set " + opt + ": " + str(exc), 126)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buf = ctypes.create_string_buffer(bpf, len(bpf))
prog = Prog(len(bpf) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
one, zero = ctypes.c_ulong(1), ctypes.c_ulong(0)
if libc.prctl(38, one, zero, zero, zero) != 0:
    fail("cannot set no_new_privs: " + os.strerror(ctypes.get_errno()), 126)
nr = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine)
rc = libc.syscall(ctypes.c_long(nr), ctypes.c_long(1), ctypes.c_long(4), ctypes.byref(prog)) if nr else -1
if rc != 0 and libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(prog), zero, zero) != 0:
    fail("cannot load the agent's filter: " + os.strerror(ctypes.get_errno()), 126)
argv = args[end + 1:]
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    fail("cannot run " + argv[0] + ": " + (exc.strerror or str(exc)), 127 if exc.errno == 2 else 126)
"""

#: BPF_MAXINSNS instructions of 8 bytes: the largest program the kernel loads
MAX_FILTER_BYTES = 4096 * 8
_HEX = frozenset("0123456789abcdef")


def which(name: str, path: str | None = None) -> str | None:
    """``shutil.which`` for a plain command name (``shutil`` costs the CLI milliseconds)."""
    for d in (path if path is not None else os.environ.get("PATH", os.defpath)).split(":"):
        candidate = os.path.join(d or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def python() -> str:
    """The interpreter the loader runs in: the system's (as the firewall's self-test)."""
    return which("python3", "/usr/bin:/bin") or sys.executable or "/usr/bin/python3"


#: The loader in C (``daemon/native/codetainer-seccomp.c``, the same contract, a tenth of
#: an interpreter's start): ``./dev setup`` and the image build it beside the venv's
#: interpreter; where it is not built, :data:`LOADER` runs in the system's Python.
NATIVE_LOADER = "codetainer-seccomp"


def native_loader() -> str | None:
    """The C loader beside this interpreter (the venv's ``bin/``), if built there."""
    path = os.path.join(os.path.dirname(sys.executable or "/"), NATIVE_LOADER)
    return path if os.access(path, os.X_OK) else None


def loader_argv(filter_hex: str, options: Sequence[str] = (), *,
                native: bool = True) -> list[str]:
    """The link that puts the filter (and ``options``) on the rest of the chain;
    ``argv...`` follows. ``native=False``: the Python loader even where the C one is."""
    exe = native_loader() if native else None
    if exe is not None:
        return [exe, filter_hex, *options, "--"]
    return [python(), "-I", "-S", "-c", LOADER, filter_hex, *options, "--"]


def agent_argv(uid: int, gid: int, argv: Sequence[str], *, filter_hex: str,
               oom_score_adj: int = OOM_SCORE_ADJ, nice: int = NICE, nproc: int = NPROC,
               cgroup_procs: Sequence[str] = ()) -> list[str]:
    """``argv`` run as ``uid``:``gid`` with no way back to privilege, under the limits
    and the seccomp filter ``filter_hex`` (see the module docstring)."""
    options = [f"--nproc={nproc}", "--core=0"] + ([f"--nice={nice}"] if nice else [])
    return [
        "/bin/sh", "-c", JOIN, JOIN_NAME, str(oom_score_adj), *cgroup_procs, "--",
        which("setpriv") or "/usr/bin/setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--",
        *loader_argv(filter_hex, options),
        *argv,
    ]


def agent_script(uid: int, gid: int, argv: Sequence[str], *, filter_hex: str,
                 oom_score_adj: int = OOM_SCORE_ADJ, nice: int = NICE, nproc: int = NPROC,
                 cgroup_procs: Sequence[str] = ()) -> str:
    """:func:`agent_argv` as one ``sh -c`` script: for a shell that runs anyway (``script``'s,
    in root's attach), which then does the prologue itself rather than start another."""
    from shlex import join

    chain = agent_argv(uid, gid, argv, filter_hex=filter_hex, oom_score_adj=oom_score_adj,
                       nice=nice, nproc=nproc, cgroup_procs=cgroup_procs)
    if chain[:4] != ["/bin/sh", "-c", JOIN, JOIN_NAME]:
        raise ValueError("the agent's chain does not start with its prologue")
    return f"set -- {join(chain[4:])}; {JOIN}"


def tmux_attach_argv(tmux: str, socket: str, session_id: str, agent_pane: str | None) -> list[str]:
    """A tmux client attached to the agent's session, its pane selected (root's attach)."""
    argv = [tmux, "-u", "-S", socket, "attach-session", "-t", session_id]
    if agent_pane:
        argv += [";", "select-pane", "-t", agent_pane]
    return argv


def checked_limits(data: object) -> tuple[int, int, int, tuple[str, ...]] | None:
    """``(oom_score_adj, nice, nproc, cgroup_procs)`` from ``ExecLimits.as_dict`` (what
    the daemon's ``session`` reply names), checked; ``None`` when it names none (the
    defaults apply). Raises ValueError on anything malformed."""
    if not isinstance(data, dict):
        return None
    oom, nice, nproc = data.get("oom_score_adj"), data.get("nice"), data.get("nproc")
    procs = data.get("cgroup_procs") or []
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (oom, nice, nproc)) \
            or not isinstance(procs, list) or not all(
                isinstance(p, str) and p.startswith("/") and p.endswith("/cgroup.procs")
                and "/../" not in p for p in procs):
        raise ValueError(f"the daemon named malformed agent limits: {data!r}")
    return int(oom or 0), int(nice or 0), int(nproc or 0), tuple(procs)


def checked_filter(value: object) -> str:
    """The compiled filter as the daemon hands it (``bytes.hex()`` of whole BPF
    instructions, at most the kernel's maximum); raises ValueError otherwise."""
    if not isinstance(value, str) or not value or len(value) % 16 or \
            len(value) > 2 * MAX_FILTER_BYTES or not _HEX.issuperset(value):
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise ValueError(f"the daemon handed a malformed seccomp filter ({shown!r}...)")
    return value
