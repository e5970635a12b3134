"""A scratch root filesystem in fresh namespaces, for boot tests that must not touch the host.

``ScratchRoot(base).run(argv, env, timeout)`` runs ``argv`` as PID 1 of new PID, mount,
UTS and (by default) network namespaces whose root has been ``pivot_root``-ed into a
scratch filesystem:

- the scratch root is a *tmpfs* mounted inside the private mount namespace, so even a
  superblock-level ``remount,ro /`` can only ever affect that tmpfs, never the host;
- ``/usr`` (and ``/bin``, ``/lib*``, ``/sbin`` as on the host: symlinks on merged-usr
  systems, else read-only binds), the project, ``/opt/ctvenv`` and the tool prefixes
  ``./dev setup`` installs (``/opt/claude-code-<version>`` and ``/opt/coredns-<version>``,
  which the host's ``/usr/local/bin/claude`` and ``coredns`` point into) are bind-mounted
  read-only at their host paths, so the editable install and the tools work unchanged;
- ``/etc`` is a copy of the host's with our own ``passwd``/``group`` (root, ``claude``
  1000, ``codetainer-dns``, ``codetainer-proxy`` 998, nobody), no ``/etc/gitconfig``;
- fresh ``/proc`` (the new PID namespace), ``/sys`` (read-only), a minimal ``/dev``
  (null, zero, full, random, urandom, tty, a private devpts for tmux, shm), empty
  ``/tmp``, ``/run``, ``/root``, ``/workspace``, ``/home/claude``;
- ``base/out`` on the host is bind-mounted read-write at ``/scratch-out`` inside: the
  way results get out;
- with ``cgroups`` (host cgroup directories a test made, ``sandbox/cgroups.py``), PID 1
  joins them before anything else runs and, unless ``show_cgroups`` is off, sees them
  at ``/sys/fs/cgroup/<controller>`` as a container sees its own cgroup.

``spawn()`` starts the same thing in the background and returns a :class:`Spawned`
with the host PID of the namespace's PID 1, ``nsenter()`` to run more commands inside
it, ``signal()``, ``wait()`` and ``kill()``. Killing the outer ``unshare`` (which runs
with ``--kill-child``) tears the whole namespace down.

Run as a script (``python scratchroot.py --inner SPEC``) it is the inner half: the code
that builds the root inside the new namespaces, pivots and execs ``argv``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[3]
VENV = Path("/opt/ctvenv")
OUT = "/scratch-out"
READY_MARK = ".pid1-ready"

PASSWD = """root:x:0:0:root:/root:/bin/bash
claude:x:1000:1000:claude:/home/claude:/bin/bash
codetainer-dns:x:999:999:codetainer DNS:/nonexistent:/usr/sbin/nologin
codetainer-proxy:x:998:998:codetainer policy proxy:/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """root:x:0:
claude:x:1000:
codetainer-dns:x:999:
codetainer-proxy:x:998:
nogroup:x:65534:
"""
DEFAULT_ENV = {
    "PATH": "/opt/ctvenv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


def tool_prefixes() -> list[str]:
    """Prefixes ``./dev setup`` installs tools into, that the host's /usr/local/bin links
    point at (the Claude Code CLI, CoreDNS): visible inside at the same paths, read-only,
    so ``/usr/local/bin/coredns`` works inside as in the image."""
    return sorted(str(p) for pattern in ("claude-code-*", "coredns-*")
                  for p in Path("/opt").glob(pattern) if p.is_dir())


class ScratchRootError(RuntimeError):
    pass


@dataclass
class ScratchRoot:
    """Describe a scratch root under ``base`` (a host directory the test owns)."""

    base: Path
    project: Path = PROJECT
    venv: Path = VENV
    passwd: str = PASSWD
    group: str = GROUP
    #: extra (host path, path inside, read_only) bind mounts
    binds: Sequence[tuple[str, str, bool]] = ()
    #: extra files written into the root before the pivot: {path inside: content}
    files: Mapping[str, str] = field(default_factory=dict)
    #: join this named network namespace (``ip netns add``) instead of a new, empty one
    netns: str | None = None
    hostname: str = "codetainer-test"
    root_size: str = "512m"
    #: host cgroup directories the namespace's PID 1 joins before anything runs, by
    #: controller ({"memory": "/sys/fs/cgroup/memory/.../ct-test-x"}: sandbox/cgroups.py)
    cgroups: Mapping[str, str] = field(default_factory=dict)
    #: and shown inside at /sys/fs/cgroup/<controller>, as a container runtime binds a
    #: container's own cgroup (False: the limits hold, the machine cannot see them)
    show_cgroups: bool = True

    def __post_init__(self) -> None:
        self.base = Path(self.base)
        self.out = self.base / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        os.chmod(self.out, 0o777)
        self._n = 0

    # --- outer half -------------------------------------------------------------------

    def _spec(self, argv: Sequence[str], env: Mapping[str, str] | None,
              cwd: str) -> Path:
        self._n += 1
        spec = {
            "root": str(self.base / f"root{self._n}"),
            "argv": list(argv),
            "env": dict(DEFAULT_ENV if env is None else env),
            "cwd": cwd,
            "ro_binds": [str(self.project), str(self.venv), *tool_prefixes()],
            "binds": [list(b) for b in self.binds] + [[str(self.out), OUT, False]],
            "files": {"/etc/passwd": self.passwd, "/etc/group": self.group,
                      "/etc/hostname": self.hostname + "\n", **self.files},
            "hostname": self.hostname,
            "root_size": self.root_size,
            "cgroups": dict(self.cgroups),
            "show_cgroups": self.show_cgroups,
            "own_netns": self.netns is None,
            "ready": str(self.out / READY_MARK),
        }
        Path(str(spec["root"])).mkdir(parents=True, exist_ok=True)
        path = self.base / f"spec{self._n}.json"
        path.write_text(json.dumps(spec))
        return path

    def _outer_argv(self, spec: Path) -> list[str]:
        if os.geteuid() != 0:
            raise ScratchRootError("scratch roots need root (mount, pivot_root, namespaces)")
        for tool in ("unshare", "pivot_root", "mount", "umount"):
            if shutil.which(tool) is None:
                raise ScratchRootError(f"{tool} is not installed (util-linux)")
        argv = ["unshare", "--mount", "--pid", "--fork", "--uts", "--kill-child",
                "--propagation", "private"]
        if self.netns is None:
            argv.append("--net")
        argv += [sys.executable, str(Path(__file__).resolve()), "--inner", str(spec)]
        if self.netns is not None:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
        return argv

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            timeout: float = 60.0, cwd: str = "/", input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as PID 1 inside; stdout/stderr captured as text."""
        (self.out / READY_MARK).unlink(missing_ok=True)
        return subprocess.run(self._outer_argv(self._spec(argv, env, cwd)), input=input,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str = "/", stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE,
              ready_timeout: float = 15.0) -> Spawned:
        """Start ``argv`` as PID 1 inside and return once it has been exec'd."""
        ready = self.out / READY_MARK
        ready.unlink(missing_ok=True)
        popen = subprocess.Popen(self._outer_argv(self._spec(argv, env, cwd)),
                                 stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + ready_timeout
        while not ready.exists():
            if popen.poll() is not None or time.monotonic() > deadline:
                _, err = _drain(popen)
                raise ScratchRootError(
                    f"scratch root did not start (exit {popen.returncode}): {err[-2000:]}")
            time.sleep(0.01)
        pid = int(ready.read_text())
        return Spawned(popen, pid)


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _drain(popen: subprocess.Popen[Any]) -> tuple[str, str]:
    if popen.poll() is None:
        popen.kill()
    out, err = popen.communicate(timeout=10)
    return _text(out), _text(err)


@dataclass
class Spawned:
    """A running scratch root. ``pid`` is the host PID of the namespace's PID 1."""

    popen: subprocess.Popen[Any]
    pid: int

    def nsenter(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                timeout: float = 30.0, input: str | None = None,
                ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespaces and root of PID 1."""
        full = ["nsenter", f"--target={self.pid}", "--mount", "--pid", "--net", "--uts",
                "--root", "--wd", "--", "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in (DEFAULT_ENV if env is None else env).items()),
                *argv]
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout)

    def communicate(self, timeout: float = 30.0) -> tuple[str, str]:
        out, err = self.popen.communicate(timeout=timeout)
        return _text(out), _text(err)

    def kill(self) -> None:
        """SIGKILL the outer unshare; --kill-child takes PID 1 and so the namespace with it."""
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass

    def __enter__(self) -> Spawned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- inner half (runs as PID 1 of the new namespaces, before exec) --------------------------

def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _bind(src: str, dst: Path, read_only: bool) -> None:
    if os.path.isdir(src):
        dst.mkdir(parents=True, exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.touch(exist_ok=True)
    _sh("mount", "--bind", src, str(dst))
    if read_only:
        _sh("mount", "-o", "remount,bind,ro", str(dst))


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _build_dev(root: Path) -> None:
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    _sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=1m,nosuid", "scratchdev", str(dev))
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists(f"/dev/{node}"):
            _bind(f"/dev/{node}", dev / node, read_only=False)
    (dev / "pts").mkdir()
    _sh("mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620,gid=5",
        "devpts", str(dev / "pts"))
    os.symlink("pts/ptmx", dev / "ptmx")
    (dev / "shm").mkdir()
    _sh("mount", "-t", "tmpfs", "-o", "mode=1777,size=16m,nosuid,nodev", "shm", str(dev / "shm"))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, dev / name)


def inner(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    with open("/proc/self/status") as f:  # still the host's /proc: "NSpid: <host> 1"
        host_pid = next(line.split()[1] for line in f if line.startswith("NSpid:"))
    for d in spec.get("cgroups", {}).values():  # "0": this process; every later one follows
        Path(d, "cgroup.procs").write_text("0")
    # 1. the scratch root: a tmpfs private to this mount namespace
    _sh("mount", "--make-rprivate", "/")
    _sh("mount", "-t", "tmpfs", "-o", f"size={spec['root_size']},mode=0755", "scratchroot",
        str(root))
    # 2. system directories, as the host lays them out
    _bind("/usr", root / "usr", read_only=True)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/", name)
        if host.is_symlink():
            os.symlink(os.readlink(host), root / name)
        elif host.is_dir():
            _bind(str(host), root / name, read_only=True)
    # 3. /etc: a copy, with our users and without host git config
    shutil.copytree("/etc", root / "etc", symlinks=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("gitconfig", "mtab"))
    os.symlink("../proc/self/mounts", root / "etc" / "mtab")
    # 4. empty directories the boot fills
    for d, mode in (("tmp", 0o1777), ("run", 0o755), ("root", 0o700), ("workspace", 0o755),
                    ("home/claude", 0o755), ("var/tmp", 0o1777), ("var/log", 0o755),
                    ("var/lib", 0o755), ("srv", 0o755)):
        p = root / d
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
    # 5. kernel filesystems
    (root / "proc").mkdir()
    _sh("mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(root / "proc"))
    (root / "sys").mkdir()
    _sh("mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", str(root / "sys"))
    _build_dev(root)
    if spec.get("cgroups") and spec.get("show_cgroups"):
        _sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=64k", "cgroups",
            str(root / "sys" / "fs" / "cgroup"))
        for controller, d in spec["cgroups"].items():
            _bind(d, root / "sys" / "fs" / "cgroup" / controller, read_only=False)
    # 6. the project, the venv, the output directory, extra binds
    for src in spec["ro_binds"]:
        _bind(src, _inside(root, src), read_only=True)
    for src, dst, ro in spec["binds"]:
        _bind(src, _inside(root, dst), read_only=ro)
    for path, content in spec["files"].items():
        p = _inside(root, path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    os.chmod(root / "etc" / "passwd", 0o644)
    os.chmod(root / "etc" / "group", 0o644)
    # 7. identity and network of the new namespaces
    socket.sethostname(spec["hostname"])
    if spec["own_netns"]:
        _sh("ip", "link", "set", "lo", "up")
    # 8. pivot: the old root goes away entirely
    os.chdir(root)
    (root / ".oldroot").mkdir()
    _sh("/usr/sbin/pivot_root", ".", ".oldroot")
    os.chdir("/")
    _sh("umount", "-l", "/.oldroot")
    os.rmdir("/.oldroot")
    os.chdir(spec["cwd"])
    # 9. tell the outer half which host PID we are, then become argv
    # atomically: the outer half polls for the file and reads it as soon as it exists
    tmp = Path(OUT, READY_MARK + ".tmp")
    tmp.write_text(host_pid)
    tmp.replace(Path(OUT, READY_MARK))
    env = spec["env"]
    argv = spec["argv"]
    exe = shutil.which(argv[0], path=env.get("PATH")) or argv[0]
    os.execve(exe, argv, env)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        try:
            inner(sys.argv[2])
        except Exception as exc:  # the outer half reports stderr
            print(f"scratchroot: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(125)
    else:
        print("usage: scratchroot.py --inner SPEC (internal)", file=sys.stderr)
        sys.exit(64)
