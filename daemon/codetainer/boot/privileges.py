"""How every agent process is started: as the agent user, stripped of privilege.

``setpriv`` (util-linux) does the whole drop in one exec, before the agent's program
runs: real/effective/saved uid and gid to the agent's, supplementary groups cleared,
``no_new_privs`` set (setuid binaries cannot regain root), and an empty capability
bounding set (nothing in the tree can ever regain CAP_NET_ADMIN, so the agent cannot
touch the firewall, even through a setuid helper). Its environment is built from an
explicit allowlist, never inherited from the daemon.

The same chain puts the process under the agent's limits (:class:`ExecLimits`, README
"What the agent can consume"), each before any agent code runs (rendered by
``boot/chain.py``, which ``codetainer attach`` renders it with too)::

    sh -c JOIN  oom_score_adj 1000, then into the agent's cgroup(s)    (as root)
    setpriv ...                                                         (the drop)
    python3 -I -S -c LOADER HEX --nproc=N --core=0 --nice=10 --         (as the agent)
    argv

Root sets what the agent must not undo (a raised ``oom_score_adj`` written by root is
also its floor; only root may move a process between cgroups). The rest comes *after*
the drop, set by the agent on itself in the loader, which cannot undo it either: the
process limit (hard limit too: it cannot raise it again) because the kernel checks
RLIMIT_NPROC at ``setresuid`` and ``execve`` against the process's *own* limit, so a
chain that set it before ``setpriv`` would fail with EAGAIN whenever the agent's uid is
at its limit, and the daemon's own tmux clients (which run as the agent) with it;
``--core=0``: no process of the tree writes a core file (hard limit: it cannot turn them
back on); the nice value, which anyone may raise and only CAP_SYS_NICE may lower (it
was ``nice -n 10`` as root before the drop: the same value, one exec less).

The seccomp filter comes right after, before anything but the chain runs as the agent:
no process of the tree can create or join a user namespace (``boot/seccomp.py``).

With the policy proxy on (``CODETAINER_PROXY=on``, :class:`AgentProxy`) the agent holds
no credential: ``GH_TOKEN`` and ``CLAUDE_CODE_OAUTH_TOKEN`` are the proxy's placeholders
(``proxy/model.py``), which the proxy swaps for the real tokens on the requests its
policy allows, and its environment names the proxy and the proxy's CA.
"""

from __future__ import annotations

import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codetainer.boot import chain
from codetainer.boot.seccomp import filter_hex
from codetainer.proxy.model import ANTHROPIC_PLACEHOLDER, GITHUB_PLACEHOLDER, PROXY_PORT

if TYPE_CHECKING:
    from codetainer.status import ExecLimitsDict

#: the chain's root prologue (boot/chain.py), named here too where the chain is explained
JOIN, JOIN_NAME = chain.JOIN, chain.JOIN_NAME

#: Variables passed through from the daemon's environment when set.
PASSTHROUGH = ("LANG", "LC_ALL", "TZ", "TERM", "COLORTERM", "FLY_APP_NAME", "FLY_MACHINE_ID",
               "FLY_REGION", "REPO_URL", "GIT_USER_NAME", "GIT_USER_EMAIL",
               # a CA the operator's network needs (a TLS-inspecting proxy; the test
               # world's stand-in for Anthropic's API): Claude Code and node honour it
               "NODE_EXTRA_CA_CERTS")

#: Secrets the agent's own environment receives (from the secrets step, not os.environ):
#: the real value with the proxy off, the proxy's placeholder for it with the proxy on.
AGENT_SECRETS = ("CLAUDE_CODE_OAUTH_TOKEN", "GH_TOKEN")
PLACEHOLDERS = {"CLAUDE_CODE_OAUTH_TOKEN": ANTHROPIC_PLACEHOLDER, "GH_TOKEN": GITHUB_PLACEHOLDER}

#: under ``<run_dir>/proxy/``: the proxy's CA certificate (Node adds it to its own
#: store), and the system bundle with it appended (tools that take one file, replacing
#: the system store)
PROXY_DIR = "proxy"
PROXY_CA = "ca.pem"
PROXY_CA_BUNDLE = "ca-bundle.pem"


@dataclass(frozen=True)
class AgentProxy:
    """What the agent is given when the policy proxy holds the credentials."""

    run_dir: str

    @classmethod
    def of(cls, settings: object) -> AgentProxy | None:
        """From the daemon's settings: ``None`` when the proxy is off."""
        on = getattr(settings, "proxy", "off")
        if on is True or (isinstance(on, str) and on.strip().lower() == "on"):
            return cls(str(getattr(settings, "run_dir", "/run/codetainer")))
        return None

    def env(self) -> dict[str, str]:
        """The proxy and its CA, in every spelling the agent's tools read."""
        url = f"http://127.0.0.1:{PROXY_PORT}"
        base = f"{self.run_dir.rstrip('/')}/{PROXY_DIR}"
        bundle = f"{base}/{PROXY_CA_BUNDLE}"
        env = {name: url for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
        env |= {name: "localhost,127.0.0.1,::1" for name in ("NO_PROXY", "no_proxy")}
        env["NODE_EXTRA_CA_CERTS"] = f"{base}/{PROXY_CA}"
        # curl and npm read their own variables, not OpenSSL's: without them they would
        # trust the CA only once it is in the system store, which a read-only /usr (or a
        # failed update-ca-certificates) leaves out
        env |= {name: bundle for name in ("SSL_CERT_FILE", "GIT_SSL_CAINFO",
                                          "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE",
                                          "NPM_CONFIG_CAFILE")}
        return env


def agent_secret(name: str, secrets: Mapping[str, str], proxy: AgentProxy | None) -> str | None:
    """What the agent holds for the secret ``name`` (one of :data:`AGENT_SECRETS`): the
    value, its placeholder when the proxy is on, ``None`` when the secret is not set."""
    value = secrets.get(name)
    if not value:
        return None
    return PLACEHOLDERS[name] if proxy is not None else value


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


@dataclass(frozen=True)
class ExecLimits:
    """The limits every agent process starts under (see the module docstring)."""

    #: first in line for the OOM killer (the daemon's own processes are -999 to -1000)
    oom_score_adj: int = chain.OOM_SCORE_ADJ
    nice: int = chain.NICE
    #: RLIMIT_NPROC, soft and hard: tasks (threads included) of the agent's uid
    nproc: int = chain.NPROC
    #: ``cgroup.procs`` of the agent's cgroup, one per v1 hierarchy (one file under v2)
    cgroup_procs: tuple[str, ...] = ()

    def as_dict(self) -> ExecLimitsDict:
        return {"oom_score_adj": self.oom_score_adj, "nice": self.nice, "nproc": self.nproc,
                "cgroup_procs": list(self.cgroup_procs)}

    @classmethod
    def from_dict(cls, data: object) -> ExecLimits:
        """The daemon's ``as_dict`` (the ``session`` op hands it to ``attach``), checked
        (``chain.checked_limits``, which ``attach`` uses without importing this module)."""
        checked = chain.checked_limits(data)
        return cls() if checked is None else cls(*checked)


def setpriv_argv(user: AgentUser, argv: list[str], limits: ExecLimits | None = None) -> list[str]:
    """Prefix ``argv`` so it runs as ``user`` with no way back to privilege, under
    ``limits`` (default: the default limits, without a cgroup) and the seccomp filter."""
    lim = limits or ExecLimits()
    return chain.agent_argv(user.uid, user.gid, argv, filter_hex=filter_hex(),
                            oom_score_adj=lim.oom_score_adj, nice=lim.nice, nproc=lim.nproc,
                            cgroup_procs=lim.cgroup_procs)


def agent_env(
    user: AgentUser,
    secrets: Mapping[str, str],
    source: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    *,
    proxy: AgentProxy | None,
) -> dict[str, str]:
    """The agent's environment: an explicit allowlist, never the daemon's environment.

    ``proxy`` (required, so that no caller forgets it: :meth:`AgentProxy.of` the
    settings): with the proxy on, placeholders instead of the secrets, and the proxy's
    variables over anything passed through (the operator's ``NODE_EXTRA_CA_CERTS`` is for
    the proxy's upstreams then, ``CODETAINER_PROXY_UPSTREAM_CA``)."""
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
        value = agent_secret(key, secrets, proxy)
        if value:
            env[key] = value
    if proxy is not None:
        env.update(proxy.env())
    if extra:
        env.update(extra)
    return env
