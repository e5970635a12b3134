"""Daemon settings: every knob is a ``CODETAINER_*`` environment variable.

Each field carries its documentation and the default as an operator types it;
``codetainer.settings.describe()`` renders the table that README.md shows, so code and
docs cannot drift apart.

Every field has its real type and is parsed and validated once, when :class:`Settings`
is built (:meth:`Settings.from_env` at the daemon's start): a bad value raises
:class:`SettingsError` naming the variable, the value and what is accepted, and
codetainerd exits 64 with that one line. A text passed to the constructor (tests,
``dataclasses.replace``) is parsed the same way. Settings that name lists with a
dedicated parser elsewhere (the allowlist, upstreams, inbound ports, the DNS limit and
hook) stay text here and are checked by their owner when the daemon is built; the
command lines (``CODETAINER_AGENT_COMMAND``) are shell text, run by ``sh``.
"""

# _opt() is called in the dataclass defaults on purpose: it returns the parsed, immutable
# default (str, int, float, bool, a tuple or a frozen dataclass) and carries the
# documentation as field metadata.
# ruff: noqa: RUF009

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
DnsEngineSetting = Literal["auto", "coredns", "dnsmasq"]
FirewallSetting = Literal["auto", "nftables", "iptables"]
Ipv6Setting = Literal["auto", "deny", "fly", "allowlist"]
AgentRestart = Literal["respawn", "leave"]

#: below this the agent, its tmux server and shells alone (~40 tasks) would not fit
MIN_PIDS = 64
MIN_MEMORY = 64 << 20
_SIZE = re.compile(r"^([1-9][0-9]*)([kmgKMG]?)$")
_PERCENT = re.compile(r"^([1-9][0-9]?|100)%$")
#: what tmpfs's size= takes: bytes with an optional k/m/g, or a share of RAM below 100%
_TMPFS_SIZE = re.compile(r"^[1-9][0-9]*[kmgKMG]?$|^[1-9][0-9]?%$")
_PLUGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._-]*)?$")
#: owner/repo, a URL, a git address, or an absolute path (a marketplace directory in the
#: image or on a volume); never anything that starts like an option
_SOURCE = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9._~:/@%+=-]*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: a parser turns the text of a variable into its value, or raises ValueError whose
#: text says what is accepted ("use one of a, b")
Parser = Callable[[str], object]


class SettingsError(ValueError):
    """A bad ``CODETAINER_*`` value: names the variable, the value and what is accepted."""

    def __init__(self, name: str, raw: str, accepted: str) -> None:
        self.variable = "CODETAINER_" + name.upper()
        self.raw = raw
        self.accepted = accepted
        super().__init__(f"{self.variable}={raw[:80]!r} is not valid: {accepted}")


def _source_root() -> Path:
    """The directory that holds ``supervisord/``, ``network/`` and ``hooks/``.

    In the image this is ``/opt/codetainer``; in a checkout it is the repository root.
    """
    here = Path(__file__).resolve().parent.parent.parent
    if (here / "supervisord").is_dir():
        return here
    return Path("/opt/codetainer")


# -- parsers -----------------------------------------------------------------------------


def choice(*values: str) -> Parser:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in values:
            raise ValueError(f"use one of {', '.join(values)}")
        return value
    return parse


def switch(on: tuple[str, ...], off: tuple[str, ...]) -> Parser:
    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in on:
            return True
        if value in off:
            return False
        raise ValueError(f"use one of {', '.join(on + off)}")
    return parse


def number(low: float, high: float | None = None, what: str = "seconds") -> Parser:
    span = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            value = float("nan")
        if not (low <= value and (high is None or value <= high)):  # NaN fails too
            raise ValueError(f"set it to a number of {what} {span}")
        return value
    return parse


def integer(low: int, high: int | None = None, what: str = "an integer") -> Parser:
    span = f"from {low} to {high}" if high is not None else f"of at least {low}"
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            value = low - 1
        if not (low <= value and (high is None or value <= high)):
            raise ValueError(f"set it to {what} {span}")
        return value
    return parse


@dataclass(frozen=True)
class MemoryLimit:
    """``CODETAINER_AGENT_MEMORY``: an absolute size, or a share of the container's."""

    size: int | None  # bytes
    percent: int | None


def parse_memory(raw: str) -> MemoryLimit:
    """``CODETAINER_AGENT_MEMORY``: a size (``3g``) or a percentage (``75%``)."""
    text = raw.strip()
    size, percent = _SIZE.match(text), _PERCENT.match(text)
    if size:
        value = int(size.group(1)) * _UNITS[size.group(2).lower()]
        if value >= MIN_MEMORY:
            return MemoryLimit(value, None)
    elif percent:
        return MemoryLimit(None, int(percent.group(1)))
    raise ValueError("set it to a size of at least 64m (3g, 2048m) or a percentage "
                     "of the container's memory (75%)")


def tmpfs_size(raw: str) -> str:
    """A tmpfs ``size=``: checked here, so a bad one stops the daemon before any mount."""
    value = raw.strip()
    if not _TMPFS_SIZE.match(value):
        raise ValueError("set it to a tmpfs size: a number with k, m or g (512m, 1g) or a "
                         "share of the RAM below 100% (50%)")
    return value


@dataclass(frozen=True)
class PluginPlan:
    """``CODETAINER_PLUGINS``: marketplaces to add, then plugins to install (each once)."""

    marketplaces: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()

    def commands(self) -> list[list[str]]:
        """Arguments after ``claude``, marketplaces first."""
        return [["plugin", "marketplace", "add", m] for m in self.marketplaces] + [
            ["plugin", "install", p] for p in self.plugins
        ]


def plugin_plan(raw: str) -> PluginPlan:
    """Comma-separated entries: a marketplace source has a ``/`` or ``:``, anything else
    is a plugin (``name@marketplace`` or a bare ``name``)."""
    markets: list[str] = []
    plugins: list[str] = []
    for part in raw.split(","):
        entry = part.strip()
        if not entry:
            continue
        if "/" in entry or ":" in entry:
            if not _SOURCE.match(entry):
                raise ValueError(f"{entry!r} is not a valid marketplace source: use owner/repo, "
                                 "a URL, a git address or an /absolute/directory")
            markets.append(entry)
        elif _PLUGIN.match(entry):
            plugins.append(entry)
        else:
            raise ValueError(f"{entry!r} is not a plugin (name@marketplace) or a marketplace "
                             "source (owner/repo): use a comma-separated list of those")
    return PluginPlan(tuple(dict.fromkeys(markets)), tuple(dict.fromkeys(plugins)))


def npm_scope(raw: str) -> str:
    """One npm scope, as ``.npmrc`` names it (``@my-org``)."""
    name = raw.strip().lstrip("@")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"{raw.strip()!r} is not an npm scope: use comma-separated scope "
                         "names (@my-org,@other)")
    return "@" + name.lower()


def scope_list(raw: str) -> tuple[str, ...]:
    return tuple(npm_scope(part) for part in raw.split(",") if part.strip())


def _opt(doc: str, default: str, parse: Parser | None = None) -> Any:
    """A setting: ``default`` as the operator types it (README shows it), parsed."""
    value = parse(default) if parse is not None else default
    return field(default=value, metadata={"doc": doc, "text": default, "parse": parse})


@dataclass(frozen=True)
class Settings:
    root: str = _opt("directory holding supervisord/, network/ and hooks/", str(_source_root()))
    run_dir: str = _opt("runtime directory (socket, generated configs)", "/run/codetainer")
    socket: str = _opt("control socket path (also --socket)", "/run/codetainer/control.sock")
    services: str = _opt("supervisord-format services file (also --services; empty: "
                         "<root>/supervisord/codetainer.conf)", "")
    log_level: LogLevel = _opt("minimum log level: debug, info, warning, error", "info",
                               choice("debug", "info", "warning", "error"))
    log_format: LogFormat = _opt("log format: auto (JSON unless stdout is a TTY), json, console",
                                 "auto", choice("auto", "json", "console"))
    shutdown_timeout: float = _opt("seconds the whole shutdown may take before SIGKILL", "30",
                                   number(0))
    # network
    allowlist: str = _opt("allowlist file (empty: <root>/network/domains.conf)", "")
    allow: str = _opt("extra allowlist entries, comma-separated", "")
    dns_engine: DnsEngineSetting = _opt(
        "DNS engine: auto (CoreDNS if installed, else dnsmasq), coredns, dnsmasq", "auto",
        choice("auto", "coredns", "dnsmasq"))
    dns_listen: str = _opt("address the local DNS server listens on", "127.0.0.53")
    upstreams: str = _opt("upstream resolvers, comma-separated", "8.8.8.8,1.1.1.1")
    dns_hook: str = _opt("the daemon's DNS forwarding hook, ip:port (empty: on for CoreDNS at "
                         "127.0.0.1:5354, off for dnsmasq; off: never)", "")
    dns_health_interval: float = _opt("seconds between the DNS server's health checks (three "
                                      "failures in a row restart it)", "15", number(0.1, 3600))
    dns_user: str = _opt("user the DNS server runs as (only it may reach upstreams)", "codetainer-dns")
    dns_limit: str = _opt("the agent's queries to the local DNS server, RATE/BURST: past a burst of "
                          "BURST, more than RATE a second are dropped (off: no limit)", "50/5000")
    firewall: FirewallSetting = _opt("firewall backend: auto (probe), nftables, iptables", "auto",
                                     choice("auto", "nftables", "iptables"))
    ipv6: Ipv6Setting = _opt("IPv6 policy: auto (fly on a Fly Machine, else deny), deny, fly, "
                             "allowlist", "auto", choice("auto", "deny", "fly", "allowlist"))
    inbound: str = _opt("published ports (docker -p) that accept inbound connections, comma-separated "
                        "tcp/PORT or udp/PORT (empty: nothing comes in)", "")
    refresh_min_ttl: float = _opt("floor of the per-name refresh interval, seconds", "30",
                                  number(0.001, 300))
    refresh_max_ttl: float = _opt("ceiling of the per-name refresh interval, seconds", "300",
                                  number(0.001, 300))
    refresh_grace: float = _opt("seconds an address stays allowed after it stops resolving", "600",
                                number(0))
    probe_allowed: str = _opt("self-test: host:port that must connect (empty: first allowlisted name)", "")
    probe_denied: str = _opt("self-test: address that must be refused", "192.0.2.1:443")
    resolv_conf: str = _opt("resolv.conf to point at the local DNS server", "/etc/resolv.conf")
    github_meta_url: str = _opt("URL of GitHub's meta API for @github", "https://api.github.com/meta")
    # policy proxy
    proxy: bool = _opt("the policy proxy every HTTP(S) request of the agent goes through: on, "
                       "off (the agent reaches allowlisted addresses directly)", "on",
                       switch(("on",), ("off",)))
    proxy_user: str = _opt("user the policy proxy runs as (the only one that can read the "
                           "credentials it adds)", "codetainer-proxy")
    proxy_upstream_ca: str = _opt("extra CA file the proxy trusts for upstream servers (empty: "
                                  "the system store only)", "")
    # boot
    agent_user: str = _opt("the agent's user name (uid 1000 in the image)", "claude")
    workspace: str = _opt("agent workspace (tmpfs)", "/workspace")
    home: str = _opt("agent home (tmpfs)", "/home/claude")
    workspace_size: str = _opt("tmpfs size of the workspace", "512m", tmpfs_size)
    tmp_size: str = _opt("tmpfs size of /tmp", "512m", tmpfs_size)
    home_size: str = _opt("tmpfs size of the agent home", "1g", tmpfs_size)
    readonly_root: bool = _opt("remount / read-only during boot (1/0)", "1", switch(_TRUE, _FALSE))
    clone_timeout: float = _opt("seconds one git clone attempt may take", "300", number(0))
    clone_attempts: int = _opt("git clone attempts (REPO_URL)", "3",
                               integer(1, what="a number of attempts"))
    clone_backoff: float = _opt("first retry delay of the clone, seconds (doubles, max 30)", "2",
                                number(0))
    github_url: str = _opt("GitHub web base: clone credentials are scoped to it", "https://github.com")
    github_api_url: str = _opt("GitHub API base for the fork (upstream) lookup", "https://api.github.com")
    github_api_timeout: float = _opt("seconds the fork lookup may take", "5", number(0))
    git_config: str = _opt("system git config written at boot (empty: $GIT_CONFIG_SYSTEM or "
                           "/etc/gitconfig)", "")
    npm_scopes: tuple[str, ...] = _opt("npm scopes served from GitHub Packages, "
                                       "comma-separated (@org)", "", scope_list)
    bin_dir: str = _opt("where claude, bun and bunx live (linked into the agent's home)",
                        "/usr/local/bin")
    # session
    tmux: str = _opt("tmux binary", "tmux")
    tmux_socket: str = _opt("tmux socket of the agent session", "/run/codetainer/tmux/agent.sock")
    agent_command: str = _opt("command run in the agent pane", "claude --dangerously-skip-permissions")
    agent_restart: AgentRestart = _opt("agent exit policy: respawn or leave", "respawn",
                                       choice("respawn", "leave"))
    plugins: PluginPlan = _opt("Claude Code plugins to install, comma-separated", "",
                               plugin_plan)
    # limits (README: What the agent can consume)
    agent_memory: MemoryLimit = _opt("memory limit of the agent's cgroup: a size (3g) or a share "
                                     "of the container's memory (75%)", "75%", parse_memory)
    agent_pids: int = _opt("most tasks (processes and threads) of the agent: its cgroup's "
                           "pids.max and each agent process's RLIMIT_NPROC", "4096",
                           integer(MIN_PIDS, 4_194_304, "a number of processes and threads"))
    agent_nice: int = _opt("nice value of every agent process (0-19)", "10",
                           integer(0, 19, "a nice value"))
    agent_cpu_weight: int = _opt("CPU weight of the agent's cgroup (cgroup v2 units, 1-10000; "
                                 "the daemon's is 100)", "20",
                                 integer(1, 10_000, "a cgroup v2 CPU weight (the daemon's is 100)"))

    def __post_init__(self) -> None:
        for f in fields(self):
            parse = cast("Parser | None", f.metadata["parse"])
            raw = getattr(self, f.name)
            if parse is None or not isinstance(raw, str):
                continue
            try:
                value = parse(raw)
            except ValueError as exc:
                raise SettingsError(f.name, raw, str(exc)) from None
            object.__setattr__(self, f.name, value)
        if self.refresh_min_ttl > self.refresh_max_ttl:
            raise SettingsError("refresh_min_ttl", f"{self.refresh_min_ttl:g}",
                                f"the floor must not exceed CODETAINER_REFRESH_MAX_TTL="
                                f"{self.refresh_max_ttl:g} (0 < floor <= ceiling <= 300 seconds)")

    def path(self, *parts: str) -> Path:
        return Path(self.root, *parts)

    @property
    def services_file(self) -> Path:
        return Path(self.services) if self.services else self.path("supervisord", "codetainer.conf")

    @property
    def allowlist_file(self) -> Path:
        return Path(self.allowlist) if self.allowlist else self.path("network", "domains.conf")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: str) -> Settings:
        """Each ``CODETAINER_*`` variable of ``env`` (default: the process environment)
        parsed once; :class:`SettingsError` on the first bad one."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = "CODETAINER_" + f.name.upper()
            if key in env:
                values[f.name] = env[key]
        values.update({k: v for k, v in overrides.items() if v})
        return cls(**values)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default as typed, meaning) for every setting, in declaration order."""
    return [
        ("CODETAINER_" + f.name.upper(), str(f.metadata["text"]), str(f.metadata["doc"]))
        for f in fields(Settings)
    ]
