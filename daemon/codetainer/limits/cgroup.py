"""The agent's own cgroup: found, created and limited where the container allows it.

Where our cgroup is: ``/proc/self/cgroup`` names it per hierarchy (``4:memory:/docker/ab``,
``0::/`` under cgroup v2), and ``/proc/self/mountinfo`` says where each hierarchy is
mounted and which of its directories the mount shows (a container runtime binds the
container's own cgroup at ``/sys/fs/cgroup/<controller>``: mount root ``/docker/ab``).
Our directory is the mount point plus our path below the mount's root; a cgroup outside
what the mount shows cannot be reached (no mode: say so).

Layout, decided here:

* cgroup v1 (one hierarchy per controller): ``<own>/agent`` under each of ``memory``,
  ``pids`` and ``cpu`` that is mounted and writable. The daemon stays in ``<own>``; v1
  has no rule against processes beside child cgroups.
* cgroup v2 (one hierarchy): children may only be limited when their parent holds no
  processes ("no internal processes"), so every process of ``<own>`` (the init, the
  daemon, the services, a ``docker exec``) moves to a leaf ``<own>/daemon`` first, then
  the controllers are enabled in ``<own>/cgroup.subtree_control`` and ``<own>/agent``
  gets its limits (as Docker-in-Docker's entrypoint does). At the real root of a v2
  hierarchy (a VM whose init is not in a cgroup) processes may stay beside children,
  and moving the VM's other processes would not be ours to do: nothing is moved there.

The agent gets memory and pids limits below the container's own and a lower CPU weight
(``plan.py``). Setting up raises :class:`CgroupError` with the reason; the caller then
runs the agent under the per-process limits alone and status says why.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from codetainer.boot.filesystem import MountEntry
from codetainer.limits.plan import LimitSettings

#: controllers the agent's cgroup is limited with, in the order status lists them
WANTED = ("memory", "pids", "cpu")
AGENT = "agent"
DAEMON_LEAF = "daemon"
#: v1 reports "no limit" as the largest page-aligned long
UNLIMITED = 1 << 60

#: per version: what each figure is called
FILES: dict[int, dict[str, str]] = {
    1: {"memory.max": "memory.limit_in_bytes", "memory.current": "memory.usage_in_bytes",
        "memory.oom": "memory.oom_control", "cpu": "cpu.shares"},
    2: {"memory.max": "memory.max", "memory.current": "memory.current",
        "memory.oom": "memory.events", "cpu": "cpu.weight"},
}

Writer = Callable[[str, str], None]


class CgroupError(Exception):
    """No agent cgroup: ``reason`` says why (status shows it after "rlimit only")."""


def write(path: str, value: str) -> None:
    """One write to a cgroup file (which must exist: the kernel makes them)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def keyed(text: str | None, key: str) -> int | None:
    """``key N`` from a flat-keyed file (memory.events, memory.oom_control, pids.events)."""
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            try:
                return int(v.strip())
            except ValueError:
                return None
    return None


def limit_value(text: str | None) -> int | None:
    """A limit file's value; None for "max", absent or (v1) effectively unlimited."""
    raw = (text or "").strip()
    if not raw.isdigit():
        return None
    value = int(raw)
    return None if value >= UNLIMITED else value


@dataclass(frozen=True)
class Hierarchy:
    version: int
    controllers: frozenset[str]  # v1: the mount's; v2: read from cgroup.controllers at use
    mountpoint: str
    root: str  # the hierarchy's directory the mount shows
    own: str  # our cgroup in the hierarchy
    readonly: bool = False

    @property
    def own_dir(self) -> str | None:
        """Our cgroup's directory, or None when the mount does not show it."""
        own, root = posixpath.normpath(self.own), posixpath.normpath(self.root)
        if root == "/":
            rel = own.lstrip("/")
        elif own == root:
            rel = ""
        elif own.startswith(root + "/"):
            rel = own[len(root) + 1:]
        else:
            return None
        return posixpath.join(self.mountpoint, rel) if rel else self.mountpoint


def discover(proc_cgroup: str, mounts: Iterable[MountEntry]) -> list[Hierarchy]:
    """Every mounted hierarchy we are in (the topmost mount on each mount point)."""
    v1: dict[frozenset[str], str] = {}
    v2: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif parts[1]:
            v1[frozenset(parts[1].split(","))] = parts[2]
    found: dict[str, Hierarchy] = {}
    for m in mounts:
        readonly = m.readonly or "ro" in m.super_options
        if m.fstype == "cgroup":
            match = next(((c, p) for c, p in v1.items() if c <= m.super_options), None)
            if match is not None:
                found[m.mountpoint] = Hierarchy(1, match[0], m.mountpoint, m.root, match[1],
                                                readonly)
        elif m.fstype == "cgroup2" and v2 is not None:
            found[m.mountpoint] = Hierarchy(2, frozenset(), m.mountpoint, m.root, v2, readonly)
        else:
            found.pop(m.mountpoint, None)  # something else mounted over it
    return list(found.values())


def choose(hierarchies: Iterable[Hierarchy]) -> tuple[int, dict[str, Hierarchy]]:
    """The version and, per wanted controller, the hierarchy to use; or CgroupError."""
    hs = list(hierarchies)
    why: list[str] = []
    for h in hs:
        if h.version != 2:
            continue
        if h.own_dir is None:
            why.append(f"our cgroup {h.own} is not under the cgroup2 mount {h.mountpoint}")
            continue
        have = set((read(posixpath.join(h.own_dir, "cgroup.controllers")) or "").split())
        usable = [c for c in WANTED if c in have]
        if "memory" in usable or "pids" in usable:
            return 2, dict.fromkeys(usable, h)
        why.append(f"cgroup2 at {h.mountpoint} offers none of memory, pids"
                   + (f" (only {' '.join(sorted(have))})" if have else ""))
    v1: dict[str, Hierarchy] = {}
    for c in WANTED:
        found = next((h for h in hs if h.version == 1 and c in h.controllers), None)
        if found is None:
            continue
        if found.own_dir is None:
            why.append(f"our {c} cgroup {found.own} is not under its mount {found.mountpoint}")
        else:
            v1[c] = found
    if v1:
        return 1, v1
    if not hs:
        why.append("no cgroup filesystem is mounted")
    elif not why:
        why.append("no mounted hierarchy has the memory, pids or cpu controller")
    raise CgroupError("; ".join(why))


@dataclass(frozen=True)
class AgentCgroup:
    version: int
    dirs: Mapping[str, str]  # controller -> the agent's cgroup directory
    memory_max: int | None = None
    pids_max: int | None = None
    cpu_weight: int | None = None
    #: cgroup v2: where the daemon's own processes went
    leaf: str | None = None
    #: the agent's memory cgroup as the kernel's OOM records name it (from its root)
    memcg: str | None = None

    @property
    def procs_files(self) -> tuple[str, ...]:
        return tuple(posixpath.join(d, "cgroup.procs") for d in sorted(set(self.dirs.values())))

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 ({next(iter(self.dirs.values()))})"
        return "cgroup v1 (" + ", ".join(f"{c} {d}" for c, d in self.dirs.items()) + ")"

    def file(self, controller: str, name: str) -> str | None:
        d = self.dirs.get(controller)
        return None if d is None else posixpath.join(d, FILES[self.version].get(name, name))

    def figure(self, controller: str, name: str, key: str | None = None) -> int | None:
        """A current figure: ``("memory", "memory.current")``, ``("pids", "pids.events",
        "max")``, ``("memory", "memory.oom", "oom_kill")``; None when not available."""
        path = self.file(controller, name)
        if path is None:
            return None
        text = read(path)
        return keyed(text, key) if key else limit_value(text)


def _walk_up(own_dir: str, mountpoint: str) -> list[str]:
    """``own_dir`` and its parents, as far up as the mount shows."""
    out, d = [own_dir], own_dir
    while d != mountpoint and d.startswith(mountpoint.rstrip("/") + "/"):
        d = posixpath.dirname(d)
        out.append(d)
    return out


def parent_limit(h: Hierarchy, controller: str, version: int) -> int | None:
    """The smallest limit on our cgroup and its visible ancestors (None: unlimited)."""
    assert h.own_dir is not None
    if version == 1 and controller == "memory":
        # v1 computes the effective limit over every ancestor, hidden ones included
        stat = read(posixpath.join(h.own_dir, "memory.stat"))
        value = keyed(stat, "hierarchical_memory_limit")
        return value if value is not None and value < UNLIMITED else None
    name = FILES[version]["memory.max"] if controller == "memory" else "pids.max"
    values = [limit_value(read(posixpath.join(d, name))) for d in _walk_up(h.own_dir, h.mountpoint)]
    found = [v for v in values if v is not None]
    return min(found) if found else None


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass  # a restarted daemon finds it, maybe with the agent still in it
    except OSError as exc:
        why = {errno.EROFS: "read-only", errno.EACCES: "not writable", errno.EPERM:
               "not permitted"}.get(exc.errno or 0, exc.strerror)
        hint = " (Docker mounts cgroups read-only unless the container may write them)" \
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else ""
        raise CgroupError(f"cannot create {path}: {why}{hint}") from None


def _procs(d: str) -> list[str]:
    return (read(posixpath.join(d, "cgroup.procs")) or "").split()


def _into_leaf(own: str, writer: Writer) -> str:
    """cgroup v2: move every process of ``own`` into ``own/daemon``; returns the leaf."""
    leaf = posixpath.join(own, DAEMON_LEAF)
    _mkdir(leaf)
    for _ in range(20):  # processes forked meanwhile land in own: go again
        pids = _procs(own)
        if not pids:
            return leaf
        for pid in pids:
            try:
                writer(posixpath.join(leaf, "cgroup.procs"), pid)
            except ProcessLookupError:
                continue
            except OSError as exc:
                raise CgroupError(f"cannot move process {pid} into {leaf}: "
                                  f"{exc.strerror}") from None
    raise CgroupError(f"{own} kept getting new processes; cannot empty it for its children")


def setup(version: int, chosen: Mapping[str, Hierarchy], limits: LimitSettings,
          machine_memory: int, writer: Writer = write) -> AgentCgroup:
    """Create and limit the agent's cgroup; raises CgroupError."""
    for c, h in chosen.items():
        if h.readonly:
            raise CgroupError(f"the {c} cgroup at {h.mountpoint} is mounted read-only")
    dirs: dict[str, str] = {}
    values: dict[str, int] = {}
    leaf = None
    if "memory" in chosen:
        parent = parent_limit(chosen["memory"], "memory", version)
        values["memory"] = limits.memory_for(min(machine_memory, parent or machine_memory))
    if "pids" in chosen:
        values["pids"] = limits.pids_for(parent_limit(chosen["pids"], "pids", version))
    if "cpu" in chosen:
        values["cpu"] = limits.cpu_weight if version == 2 else limits.cpu_shares
    files = {"memory": FILES[version]["memory.max"], "pids": "pids.max",
             "cpu": FILES[version]["cpu"]}
    if version == 2:
        own = next(iter(chosen.values())).own_dir
        assert own is not None
        if os.path.exists(posixpath.join(own, "cgroup.type")):  # not the hierarchy's root
            leaf = _into_leaf(own, writer)
        try:
            writer(posixpath.join(own, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in chosen))
        except OSError as exc:
            raise CgroupError(f"cannot enable {', '.join(chosen)} for the children of {own}: "
                              f"{exc.strerror}") from None
    for c, h in chosen.items():
        assert h.own_dir is not None
        d = posixpath.join(h.own_dir, AGENT)
        if d not in dirs.values():
            _mkdir(d)
        try:
            writer(posixpath.join(d, files[c]), str(values[c]))
        except OSError as exc:
            raise CgroupError(f"cannot set {files[c]} of {d} to {values[c]}: "
                              f"{exc.strerror}") from None
        dirs[c] = d
    memcg = posixpath.join(chosen["memory"].own, AGENT) if "memory" in chosen else None
    return AgentCgroup(version, dirs, memory_max=values.get("memory"),
                       pids_max=values.get("pids"),
                       cpu_weight=limits.cpu_weight if "cpu" in values else None, leaf=leaf,
                       memcg=memcg)


def remove(cg: AgentCgroup) -> list[str]:
    """Remove the agent's cgroup directories (best effort: one still holding a process
    stays); returns what could not be removed, with why."""
    left = []
    for d in sorted(set(cg.dirs.values())):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError as exc:
            left.append(f"{d}: {exc.strerror}")
    return left
