"""How every agent process is started: as the agent user, stripped of privilege.

``setpriv`` (util-linux) does the whole drop in one exec, before the agent's program
runs: real/effective/saved uid and gid to the agent's, supplementary groups cleared,
``no_new_privs`` set (setuid binaries cannot regain root), and an empty capability
bounding set (nothing in the tree can ever regain CAP_NET_ADMIN, so the agent cannot
touch the firewall, even through a setuid helper). Its environment is built from an
explicit allowlist, never inherited from the daemon.

The same chain puts the process under the agent's limits (:class:`ExecLimits`, README
"What the agent can consume"), each before any agent code runs::

    sh -c JOIN  oom_score_adj 1000, then into the agent's cgroup(s)    (as root)
    nice -n 10                                                          (as root)
    setpriv ...                                                         (the drop)
    prlimit --nproc=N:N                                                 (as the agent)
    argv

Root sets what the agent must not undo (a raised ``oom_score_adj`` written by root is
also its floor; a nice value cannot be lowered without CAP_SYS_NICE; only root may move
a process between cgroups). The process limit comes *after* the drop, set by the agent
on itself (it cannot raise a hard limit again): the kernel checks RLIMIT_NPROC at
``setresuid`` and ``execve`` against the process's *own* limit, so a chain that set it
before ``setpriv`` would fail with EAGAIN whenever the agent's uid is at its limit, and
the daemon's own tmux clients (which run as the agent) with it.
"""

from __future__ import annotations

import pwd
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SETPRIV = "setpriv"

#: Variables passed through from the daemon's environment when set.
PASSTHROUGH = ("LANG", "LC_ALL", "TZ", "TERM", "COLORTERM", "FLY_APP_NAME", "FLY_MACHINE_ID",
               "FLY_REGION", "REPO_URL", "GIT_USER_NAME", "GIT_USER_EMAIL",
               # a CA the operator's network needs (a TLS-inspecting proxy; the test
               # world's stand-in for Anthropic's API): Claude Code and node honour it
               "NODE_EXTRA_CA_CERTS")

#: Secrets the agent's own environment receives (from the secrets step, not os.environ).
AGENT_SECRETS = ("CLAUDE_CODE_OAUTH_TOKEN", "GH_TOKEN")


@dataclass(frozen=True)
class AgentUser:
    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str, home: str | None = None) -> AgentUser:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise LookupError(
                f"agent user {name!r} does not exist: create it (useradd -u 1000 {name}) "
                "or set CODETAINER_AGENT_USER"
            ) from None
        return cls(name, pw.pw_uid, pw.pw_gid, home or pw.pw_dir)


#: ``sh -c`` prologue, run as root: $1 the oom_score_adj, then cgroup.procs files up to
#: ``--``, then the rest of the chain. Any failure stops the launch (fail closed, 126).
JOIN = ('echo "$1" >/proc/self/oom_score_adj || exit 126; shift; '
        'while [ "$1" != -- ]; do echo $$ >"$1" || exit 126; shift; done; shift; exec "$@"')
JOIN_NAME = "codetainer-limits"  # $0: names the prologue in its error messages


@dataclass(frozen=True)
class ExecLimits:
    """The limits every agent process starts under (see the module docstring)."""

    #: first in line for the OOM killer (the daemon's own processes are -999 to -1000)
    oom_score_adj: int = 1000
    nice: int = 10
    #: RLIMIT_NPROC, soft and hard: tasks (threads included) of the agent's uid
    nproc: int = 4096
    #: ``cgroup.procs`` of the agent's cgroup, one per v1 hierarchy (one file under v2)
    cgroup_procs: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"oom_score_adj": self.oom_score_adj, "nice": self.nice, "nproc": self.nproc,
                "cgroup_procs": list(self.cgroup_procs)}

    @classmethod
    def from_dict(cls, data: object) -> ExecLimits:
        """The daemon's ``as_dict`` (the ``session`` op hands it to ``attach``), checked."""
        if not isinstance(data, dict):
            return cls()
        ints = {k: data.get(k) for k in ("oom_score_adj", "nice", "nproc")}
        procs = data.get("cgroup_procs") or []
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()) or \
                not isinstance(procs, list) or not all(
                    isinstance(p, str) and p.startswith("/") and p.endswith("/cgroup.procs")
                    and "/../" not in p for p in procs):
            raise ValueError(f"the daemon named malformed agent limits: {data!r}")
        return cls(int(ints["oom_score_adj"] or 0), int(ints["nice"] or 0),
                   int(ints["nproc"] or 0), tuple(procs))


def setpriv_argv(user: AgentUser, argv: list[str], limits: ExecLimits | None = None) -> list[str]:
    """Prefix ``argv`` so it runs as ``user`` with no way back to privilege, under
    ``limits`` (default: the default limits, without a cgroup)."""
    lim = limits or ExecLimits()
    setpriv = shutil.which(SETPRIV) or "/usr/bin/setpriv"
    prologue = ["/bin/sh", "-c", JOIN, JOIN_NAME, str(lim.oom_score_adj), *lim.cgroup_procs, "--"]
    if lim.nice:
        prologue += [shutil.which("nice") or "/usr/bin/nice", "-n", str(lim.nice)]
    rlimit = [shutil.which("prlimit") or "/usr/bin/prlimit", f"--nproc={lim.nproc}:{lim.nproc}",
              "--"]
    return [
        *prologue,
        setpriv,
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--",
        *rlimit,
        *argv,
    ]


def agent_env(
    user: AgentUser,
    secrets: Mapping[str, str],
    source: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The agent's environment: an explicit allowlist, never the daemon's environment."""
    env = {
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": "/bin/bash",
        "PATH": f"{user.home}/.local/bin:{user.home}/.bun/bin:{user.home}/go/bin:"
        "/usr/local/go/bin:/usr/local/bin:/usr/bin:/bin",
        "LANG": "en_US.UTF-8",
        "TERM": "xterm-256color",
    }
    for key in PASSTHROUGH:
        if key in source:
            env[key] = source[key]
    for key in AGENT_SECRETS:
        if secrets.get(key):
            env[key] = secrets[key]
    if extra:
        env.update(extra)
    return env
