"""The agent's seccomp filter: no process of its tree can create a user namespace.

User namespaces are where most container escapes start: inside one an unprivileged
process holds every capability over the namespaces it creates, and so reaches kernel
code (netfilter, mounts of filesystems, io paths) that the kernel otherwise keeps for
root. The agent needs none of it. ``kernel`` sysctls (``user.max_user_namespaces=0``)
would close it machine-wide, but that is the host's setting under Docker (a read-only
``/proc/sys``) and in the tests here (one kernel shared with the host); a seccomp filter
is per process tree, works under every runtime, and is tested (docs/security.md).

The filter (:data:`RULES`, default allow):

- ``unshare`` and ``clone`` with ``CLONE_NEWUSER`` in their flags: EPERM (what the kernel
  itself answers when user namespaces are off);
- ``clone3``: ENOSYS. Its flags are in a structure in memory, which a seccomp filter
  cannot read; ENOSYS makes glibc (2.34+), and every runtime that tries ``clone3``
  first, fall back to ``clone``, whose flags the filter sees (Docker's default profile
  does the same);
- ``setns``: EPERM. Joining any namespace needs CAP_SYS_ADMIN over its owner, which the
  agent has only in a user namespace of its own; the one use left would be joining a
  user namespace another process of uid 1000 made outside this tree. Its type is not
  always in the arguments (``nstype`` 0, a pidfd), so the call is refused whole.

The 32-bit ABIs of the machine (i386 and x32 on x86-64, arm on arm64) are in the same
filter with the same rules, so ``int 0x80`` is no way around it.

How it is put on every agent process: the daemon compiles the filter once with
libseccomp (pyseccomp, a ctypes binding with the API of libseccomp's own ``seccomp``
module) to classic BPF, and the exec chain (``privileges.setpriv_argv``, rendered by
``boot/chain.py``) runs :data:`LOADER` right after the privilege drop: ``python3 -I -S -c
LOADER <hex> [limits] -- argv...`` sets the process's limits, loads the program
(``seccomp(2)``, ``no_new_privs`` already set by setpriv) and execs the rest of the
chain. A filter is inherited by every child and kept across ``execve``; nothing can
remove it. If it cannot be loaded the chain stops with 126, the program never runs (fail
closed). ``codetainer attach`` does not compile it: the daemon's ``session`` reply
carries :func:`filter_hex` (a client that imported libseccomp would pay for it on every
attach).
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from typing import Any

from codetainer.boot import chain

CLONE_NEWUSER = 0x10000000

#: the loader's source and its interpreter live with the rest of the chain (boot/chain.py,
#: which ``codetainer attach`` imports without this module)
LOADER = chain.LOADER
python = chain.python


@dataclass(frozen=True)
class Rule:
    syscall: str
    errno: int
    #: refused only when argument 0 (the flags of ``clone``/``unshare``) has these bits;
    #: ``None``: always
    flags: int | None
    why: str


RULES: tuple[Rule, ...] = (
    Rule("unshare", errno.EPERM, CLONE_NEWUSER, "a new user namespace"),
    Rule("clone", errno.EPERM, CLONE_NEWUSER, "a child in a new user namespace"),
    Rule("clone3", errno.ENOSYS, None,
         "flags in memory the filter cannot read: callers fall back to clone"),
    Rule("setns", errno.EPERM, None,
         "joining a namespace (only ever possible into a user namespace of its own uid)"),
)

#: the other ABIs a process of this machine's architecture can call the kernel through
COMPAT_ARCHES = {"x86_64": ("X86", "X32"), "aarch64": ("ARM",)}


class SeccompUnavailable(RuntimeError):
    """The filter cannot be built here (no libseccomp): no agent process may start."""


#: the sonames pyseccomp looks up (the ABI fixes them): offered before ``ldconfig -p``
SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> Any:
    """``import pyseccomp``, whose module finds libc and libseccomp with
    ``ctypes.util.find_library``: that runs ``ldconfig -p`` once for each, two processes and
    ~27 ms of every boot (measured). The sonames are fixed by the ABI, so each is loaded
    by name first; only one that does not load is left to ``find_library``."""
    import ctypes
    import ctypes.util

    find = ctypes.util.find_library

    def by_soname(name: str) -> str | None:
        soname = SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return find(name)

    ctypes.util.find_library = by_soname
    try:
        import pyseccomp  # type: ignore[import-untyped]  # a ctypes binding, no stubs
    finally:
        ctypes.util.find_library = find
    return pyseccomp


@functools.cache
def compile_filter(rules: tuple[Rule, ...] = RULES) -> bytes:
    """``rules`` as a classic BPF program for this machine (``struct sock_filter[]``)."""
    try:
        sc = _import_pyseccomp()
    except (ImportError, RuntimeError) as exc:  # RuntimeError: no libseccomp.so found
        raise SeccompUnavailable(
            f"cannot build the agent's seccomp filter: {exc}; install libseccomp2 and the "
            "pyseccomp package (a dependency of codetainer)") from None
    import tempfile

    filt = sc.SyscallFilter(sc.ALLOW)
    for arch in COMPAT_ARCHES.get(os.uname().machine, ()):
        filt.add_arch(getattr(sc.Arch, arch))
    for rule in rules:
        args = [] if rule.flags is None else [sc.Arg(0, sc.MASKED_EQ, rule.flags, rule.flags)]
        filt.add_rule(sc.ERRNO(rule.errno), rule.syscall, *args)
    with tempfile.TemporaryFile() as out:
        filt.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"libseccomp exported a malformed program ({len(program)} bytes)")
    return program


@functools.cache
def filter_hex() -> str:
    """The agent's filter as the loader takes it (and the ``session`` reply hands it)."""
    return compile_filter().hex()


@functools.cache
def loader_argv() -> tuple[str, ...]:
    """The chain's link that puts the filter on the rest of it; ``argv...`` follows."""
    return tuple(chain.loader_argv(filter_hex()))
