"""How every agent process is started: as the agent user, stripped of privilege.

``setpriv`` (util-linux) does the whole drop in one exec, before the agent's program
runs: real/effective/saved uid and gid to the agent's, supplementary groups cleared,
``no_new_privs`` set (setuid binaries cannot regain root), and an empty capability
bounding set (nothing in the tree can ever regain CAP_NET_ADMIN, so the agent cannot
touch the firewall, even through a setuid helper). Its environment is built from an
explicit allowlist, never inherited from the daemon.
"""

from __future__ import annotations

import pwd
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

SETPRIV = "setpriv"

#: Variables passed through from the daemon's environment when set.
PASSTHROUGH = ("LANG", "LC_ALL", "TZ", "TERM", "COLORTERM", "FLY_APP_NAME", "FLY_MACHINE_ID",
               "FLY_REGION", "REPO_URL", "GIT_USER_NAME", "GIT_USER_EMAIL")

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


def setpriv_argv(user: AgentUser, argv: list[str]) -> list[str]:
    """Prefix ``argv`` so it runs as ``user`` with no way back to privilege."""
    setpriv = shutil.which(SETPRIV) or "/usr/bin/setpriv"
    return [
        setpriv,
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--",
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
