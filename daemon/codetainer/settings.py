"""Daemon settings: every knob is a ``CODETAINER_*`` environment variable.

Each field carries its documentation; ``codetainer.settings.describe()`` renders the
table that README.md shows, so code and docs cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


def _source_root() -> Path:
    """The directory that holds ``supervisord/``, ``network/`` and ``hooks/``.

    In the image this is ``/opt/codetainer``; in a checkout it is the repository root.
    """
    here = Path(__file__).resolve().parent.parent.parent
    if (here / "supervisord").is_dir():
        return here
    return Path("/opt/codetainer")


def _opt(doc: str, default: str) -> str:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Settings:
    root: str = _opt("directory holding supervisord/, network/ and hooks/", str(_source_root()))
    run_dir: str = _opt("runtime directory (socket, generated configs)", "/run/codetainer")
    socket: str = _opt("control socket path (also --socket)", "/run/codetainer/control.sock")
    services: str = _opt("supervisord-format services file (also --services; empty: "
                         "<root>/supervisord/codetainer.conf)", "")
    log_level: str = _opt("minimum log level: debug, info, warning, error", "info")
    log_format: str = _opt("log format: auto (JSON unless stdout is a TTY), json, console", "auto")
    shutdown_timeout: str = _opt("seconds the whole shutdown may take before SIGKILL", "30")
    # network
    allowlist: str = _opt("allowlist file (empty: <root>/network/domains.conf)", "")
    allow: str = _opt("extra allowlist entries, comma-separated", "")
    dns_engine: str = _opt("DNS engine: auto (CoreDNS if installed, else dnsmasq), coredns, dnsmasq", "auto")
    dns_listen: str = _opt("address the local DNS server listens on", "127.0.0.53")
    upstreams: str = _opt("upstream resolvers, comma-separated", "8.8.8.8,1.1.1.1")
    dns_hook: str = _opt("the daemon's DNS forwarding hook, ip:port (empty: on for CoreDNS at "
                         "127.0.0.1:5354, off for dnsmasq; off: never)", "")
    dns_health_interval: str = _opt("seconds between the DNS server's health checks (three "
                                    "failures in a row restart it)", "15")
    dns_user: str = _opt("user the DNS server runs as (only it may reach upstreams)", "codetainer-dns")
    firewall: str = _opt("firewall backend: auto (probe), nftables, iptables", "auto")
    ipv6: str = _opt("IPv6 policy: auto (fly on a Fly Machine, else deny), deny, fly, allowlist",
                     "auto")
    inbound: str = _opt("published ports (docker -p) that accept inbound connections, comma-separated "
                        "tcp/PORT or udp/PORT (empty: nothing comes in)", "")
    refresh_min_ttl: str = _opt("floor of the per-name refresh interval, seconds", "30")
    refresh_max_ttl: str = _opt("ceiling of the per-name refresh interval, seconds", "300")
    refresh_grace: str = _opt("seconds an address stays allowed after it stops resolving", "600")
    probe_allowed: str = _opt("self-test: host:port that must connect (empty: first allowlisted name)", "")
    probe_denied: str = _opt("self-test: address that must be refused", "192.0.2.1:443")
    resolv_conf: str = _opt("resolv.conf to point at the local DNS server", "/etc/resolv.conf")
    github_meta_url: str = _opt("URL of GitHub's meta API for @github", "https://api.github.com/meta")
    # boot
    agent_user: str = _opt("the agent's user name (uid 1000 in the image)", "claude")
    workspace: str = _opt("agent workspace (tmpfs)", "/workspace")
    home: str = _opt("agent home (tmpfs)", "/home/claude")
    workspace_size: str = _opt("tmpfs size of the workspace", "512m")
    tmp_size: str = _opt("tmpfs size of /tmp", "512m")
    home_size: str = _opt("tmpfs size of the agent home", "1g")
    readonly_root: str = _opt("remount / read-only during boot (1/0)", "1")
    clone_timeout: str = _opt("seconds one git clone attempt may take", "300")
    clone_attempts: str = _opt("git clone attempts (REPO_URL)", "3")
    clone_backoff: str = _opt("first retry delay of the clone, seconds (doubles, max 30)", "2")
    github_url: str = _opt("GitHub web base: clone credentials are scoped to it", "https://github.com")
    github_api_url: str = _opt("GitHub API base for the fork (upstream) lookup", "https://api.github.com")
    github_api_timeout: str = _opt("seconds the fork lookup may take", "5")
    git_config: str = _opt("system git config written at boot (empty: $GIT_CONFIG_SYSTEM or "
                           "/etc/gitconfig)", "")
    npm_scopes: str = _opt("npm scopes served from GitHub Packages, comma-separated (@org)", "")
    bin_dir: str = _opt("where claude, bun and bunx live (linked into the agent's home)",
                        "/usr/local/bin")
    # session
    tmux: str = _opt("tmux binary", "tmux")
    tmux_socket: str = _opt("tmux socket of the agent session", "/run/codetainer/tmux/agent.sock")
    agent_command: str = _opt("command run in the agent pane", "claude --dangerously-skip-permissions")
    agent_restart: str = _opt("agent exit policy: respawn or leave", "respawn")
    plugins: str = _opt("Claude Code plugins to install, comma-separated", "")
    # limits (README: What the agent can consume)
    agent_memory: str = _opt("memory limit of the agent's cgroup: a size (3g) or a share of the "
                             "container's memory (75%)", "75%")
    agent_pids: str = _opt("most tasks (processes and threads) of the agent: its cgroup's "
                           "pids.max and each agent process's RLIMIT_NPROC", "4096")
    agent_nice: str = _opt("nice value of every agent process (0-19)", "10")
    agent_cpu_weight: str = _opt("CPU weight of the agent's cgroup (cgroup v2 units, 1-10000; "
                                 "the daemon's is 100)", "20")

    def path(self, *parts: str) -> Path:
        return Path(self.root, *parts)

    @property
    def services_file(self) -> Path:
        return Path(self.services) if self.services else self.path("supervisord", "codetainer.conf")

    @property
    def allowlist_file(self) -> Path:
        return Path(self.allowlist) if self.allowlist else self.path("network", "domains.conf")

    def number(self, name: str) -> float:
        """A numeric setting, with an error that names the variable on bad input."""
        raw = getattr(self, name)
        try:
            return float(raw)
        except ValueError:
            raise ValueError(
                f"CODETAINER_{name.upper()}={raw!r} is not a number: set it to a number of seconds"
            ) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: str) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, str] = {}
        for f in fields(cls):
            key = "CODETAINER_" + f.name.upper()
            if key in env:
                values[f.name] = env[key]
        values.update({k: v for k, v in overrides.items() if v})
        return cls(**values)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting, in declaration order."""
    return [
        ("CODETAINER_" + f.name.upper(), str(f.default), str(f.metadata["doc"]))
        for f in fields(Settings)
    ]
