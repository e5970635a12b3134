"""Boot step ``filesystem``: the agent's writable world, on tmpfs.

``/workspace``, ``/tmp`` and the agent's home are fresh tmpfs mounts (sizes from
settings), so nothing the agent writes touches the image and a restart starts clean.
The home gets its skeleton (``.cache``, ``.claude``, ``.local/bin``, ``.bun/bin``,
``go/bin``), a ``.bashrc``/``.profile``, and the links into ``/usr/local/bin`` that the
tmpfs hid. Mounts go through ``mount(2)`` directly (ctypes): no fork per mount, and an
errno we can explain.

Also home of the small mount helpers the other boot steps use (mountinfo parsing,
``mount(2)``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.privileges import AgentUser

if TYPE_CHECKING:
    from codetainer.settings import Settings

log = structlog.get_logger("codetainer.boot")

# mount(2) flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21

#: links re-created in the agent's home: link (relative to home) -> binary name in bin_dir
HOME_LINKS = {
    ".local/bin/claude": "claude",
    ".bun/bin/bun": "bun",
    ".bun/bin/bunx": "bunx",
}
HOME_DIRS = (".cache", ".claude", ".config", ".local/bin", ".bun/bin", "go/bin")


# --- mounts -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    """``mount(2)``; raises OSError with the errno and the target in the message."""
    rc = _libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data is not None else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: frozenset[str]  # per-mount options (ro, nosuid, ...)
    super_options: frozenset[str]  # filesystem options (size=..., mode=..., uid=...)
    root: str = "/"  # the directory of the filesystem mounted here (a bind mount's source)

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    def super_option(self, key: str) -> str | None:
        for item in self.super_options:
            k, _, v = item.partition("=")
            if k == key:
                return v
        return None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount, in mount order (a later entry on the same point is on top)."""
    out: list[MountEntry] = []
    with open(mountinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            pre, sep, post = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            a, b = pre.split(), post.split()
            if len(a) < 6 or len(b) < 3:
                continue
            out.append(MountEntry(
                mountpoint=_unescape(a[4]),
                fstype=b[0],
                source=_unescape(b[1]),
                options=frozenset(a[5].split(",")),
                super_options=frozenset(b[2].split(",")),
                root=_unescape(a[3]),
            ))
    return out


def mount_at(path: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``."""
    want = os.path.normpath(str(path))
    found = None
    for m in mounts():
        if m.mountpoint == want:
            found = m
    return found


def mount_of(path: str | os.PathLike[str]) -> MountEntry:
    """The mount that holds ``path`` (longest mount-point prefix, topmost)."""
    want = os.path.realpath(str(path))
    best: MountEntry | None = None
    for m in mounts():
        mp = m.mountpoint
        if (want == mp or want.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mountpoint)
        ):
            best = m
    if best is None:  # pragma: no cover - "/" is always mounted
        raise LookupError(f"no mount holds {want}")
    return best


def ensure_writable_run_dir(settings: Settings, size: str = "16m") -> bool:
    """Give the runtime directory its own tmpfs unless it already is a mount of its own.

    On the root filesystem the read-only-root step would freeze it (the control socket,
    generated DNS configs and the remotes snapshot live there); on a ``/run`` shared with
    others (a world-writable ``/run/lock``) the agent could fill it. Call this at daemon
    start, BEFORE the control socket is created: a tmpfs mounted later would hide the
    socket. Returns True when it mounted.
    """
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if mount_of(run_dir).mountpoint == os.path.realpath(run_dir):
        return False
    mount("codetainer-run", str(run_dir), "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={size},mode=0755")
    log.info("run_dir_mounted", path=str(run_dir), size=size)
    return True


# --- tmpfs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tmpfs:
    path: str
    size: str
    mode: int
    uid: int
    gid: int
    inodes: int | None = None  # nr_inodes (None: the kernel's default, half the RAM pages)

    @property
    def data(self) -> str:
        inodes = f",nr_inodes={self.inodes}" if self.inodes else ""
        return f"size={self.size},mode={self.mode:04o},uid={self.uid},gid={self.gid}{inodes}"


def tmpfs_plan(settings: Settings, user: AgentUser) -> list[Tmpfs]:
    """The sizes were checked when the settings were parsed (a bad one exits 64)."""
    plan = [
        Tmpfs(settings.workspace, settings.workspace_size, 0o755, user.uid, user.gid),
        Tmpfs("/tmp", settings.tmp_size, 0o1777, 0, 0),
        Tmpfs(settings.home, settings.home_size, 0o750, user.uid, user.gid),
    ]
    tmux_dir = Path(settings.tmux_socket).parent
    if Path(settings.run_dir) in tmux_dir.parents:
        # The agent owns its tmux directory: on a small tmpfs of its own, filling it
        # cannot fill the daemon's runtime directory around it.
        plan.append(Tmpfs(str(tmux_dir), "4m", 0o700, user.uid, user.gid, inodes=256))
    return plan


def mount_tmpfs(t: Tmpfs) -> None:
    Path(t.path).mkdir(parents=True, exist_ok=True)
    try:
        mount("tmpfs", t.path, "tmpfs", MS_NOSUID | MS_NODEV, t.data)
    except OSError as exc:
        hint = ("the daemon needs CAP_SYS_ADMIN to mount (run the container as root; "
                "docker run needs --cap-add SYS_ADMIN or --privileged)"
                if exc.errno == errno.EPERM else None)
        raise StepError(f"cannot mount tmpfs on {t.path}: {os.strerror(exc.errno or 0)}",
                        hint) from None
    log.info("tmpfs_mounted", path=t.path, size=t.size, mode=f"{t.mode:04o}", uid=t.uid)


# --- home skeleton ----------------------------------------------------------------------

BASHRC = r"""# ~/.bashrc, written by codetainer at every boot (the home is a tmpfs).
export PATH="$HOME/.local/bin:$HOME/.bun/bin:$HOME/go/bin:/usr/local/go/bin:/usr/local/bin:/usr/bin:/bin"
export GOPATH="$HOME/go"
export GOBIN="$HOME/go/bin"
export GOTOOLCHAIN=local
export BUN_INSTALL="$HOME/.bun"
export EDITOR="${EDITOR:-vi}"

case $- in *i*) ;; *) return ;; esac

HISTCONTROL=ignoreboth
HISTSIZE=10000
shopt -s histappend checkwinsize

# Prompt: path relative to the repository's parent, and the branch (or short commit).
__ct_prompt() {
    local top rel branch
    if top=$(git rev-parse --show-toplevel 2>/dev/null); then
        rel="${top##*/}${PWD#"$top"}"
        branch=$(git symbolic-ref --quiet --short HEAD 2>/dev/null \
                 || git rev-parse --short HEAD 2>/dev/null || echo '?')
        # The names come from the repository: keep them out of prompt expansion.
        rel=${rel//\\/\\\\}; rel=${rel//\$/\\\$}; rel=${rel//\`/\\\`}
        branch=${branch//\\/\\\\}; branch=${branch//\$/\\\$}; branch=${branch//\`/\\\`}
        PS1="\[\e[1;34m\]${rel}\[\e[0m\] \[\e[0;33m\](${branch})\[\e[0m\] \\$ "
    else
        PS1='\[\e[1;34m\]\w\[\e[0m\] \$ '
    fi
}
PROMPT_COMMAND=__ct_prompt
"""

PROFILE = """# ~/.profile, written by codetainer at every boot.
if [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ]; then
    . "$HOME/.bashrc"
fi
"""


def write_file(path: Path, text: str, mode: int, uid: int, gid: int) -> None:
    """Write atomically with the final mode from the start (no window with wider access)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)



def _own(path: Path, uid: int, gid: int, mode: int) -> None:
    os.lchown(path, uid, gid)
    if not path.is_symlink():
        os.chmod(path, mode)


def write_home(home: Path, uid: int, gid: int, bin_dir: Path) -> list[str]:
    """Skeleton, shell files and links; returns the links skipped (with why)."""
    for rel in HOME_DIRS:
        parts = Path(rel).parts
        for i in range(1, len(parts) + 1):  # every level: .local, then .local/bin
            d = home.joinpath(*parts[:i])
            d.mkdir(exist_ok=True)
            _own(d, uid, gid, 0o755)
    for name, text in ((".bashrc", BASHRC), (".profile", PROFILE)):
        p = home / name
        p.write_text(text)
        _own(p, uid, gid, 0o644)
    skipped: list[str] = []
    for rel, binary in HOME_LINKS.items():
        target = bin_dir / binary
        link = home / rel
        if not os.path.exists(target):
            skipped.append(f"{rel} ({target} is absent)")
            log.info("home_link_skipped", link=str(link), target=str(target),
                     reason="target is absent")
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        os.lchown(link, uid, gid)
    _own(home, uid, gid, 0o750)
    return skipped


async def _run(ctx: BootContext) -> str:
    settings = ctx.settings
    try:
        user = ctx.agent()  # looked up once: the later steps take it from here
    except LookupError as exc:
        raise StepError(str(exc)) from None
    plan = tmpfs_plan(settings, user)
    for t in plan:
        mount_tmpfs(t)
    bin_dir = Path(settings.bin_dir)
    skipped = write_home(Path(settings.home), user.uid, user.gid, bin_dir)
    sizes = ", ".join(f"{t.path} {t.size}" for t in plan)
    return f"tmpfs {sizes}" + (f"; skipped links: {', '.join(skipped)}" if skipped else "")


def filesystem_step() -> Step:
    return Step("filesystem", _run, timeout=10.0, policy=Policy.FATAL,
                description="tmpfs for workspace, /tmp and home; home skeleton")


def writable(paths: Iterable[str]) -> dict[str, bool]:
    """For each path, whether a file can be created in it right now (probe and remove)."""
    out: dict[str, bool] = {}
    for p in paths:
        probe = Path(p, f".codetainer-probe-{os.getpid()}")
        try:
            probe.write_bytes(b"")
            probe.unlink()
            out[p] = True
        except OSError:
            out[p] = False
    return out
