"""What the control socket's ``status`` op returns, as types: the JSON, section by section.

The daemon builds these values and sends data (a reason or a verdict is one string
among them); the lines a person reads are laid out from them by the CLI alone
(``cli/render.py``: ``codetainer status``, ``wait``, ``why``, ``attach``). A field that
is only sometimes there is ``NotRequired``; a value that may be unknown is ``| None``.
Pure types: nothing here runs (importing it costs ``typing``).
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

# -- top level -----------------------------------------------------------------------------


class HealthReply(TypedDict):
    """``status`` with ``brief`` (``status --check``, the HEALTHCHECK): the state and why."""

    state: str  # BootState's value: BOOTING, READY, DEGRADED, FAILED, STOPPING, STOPPED
    reasons: list[str]  # one line per step (or part) that is failed or degraded


class StatusReply(HealthReply):
    """``status``. The sections after ``daemon`` are there when their part is; network,
    limits and proxy are ``{"error": "Type: message"}`` when building one raised."""

    version: str
    steps: list[StepStatus]
    services: list[ServiceStatus]
    daemon: DaemonInfo
    session: NotRequired[SessionStatus]
    network: NotRequired[NetworkStatus | SectionError]
    limits: NotRequired[LimitsStatus | SectionError]
    proxy: NotRequired[ProxyStatus | SectionError]


class SectionError(TypedDict):
    error: str


# -- daemon, boot, services ----------------------------------------------------------------


class HeapStatus(TypedDict):
    frozen_objects: int
    full_collections: int
    longest_full_collection_ms: float


class DaemonSample(TypedDict):
    """What the daemon samples of itself at most once a second."""

    pid: int
    rss_bytes: int
    socket: str
    init_pid: NotRequired[int]  # when the init (codetainerd's parent) is ours
    init_rss_bytes: NotRequired[int]


class DaemonInfo(DaemonSample):
    uptime_s: float
    heap: HeapStatus
    boot_s: float | None  # None while booting


class StepStatus(TypedDict):
    """One boot step (also the payload of a ``boot.step`` event, with ``event``)."""

    name: str
    policy: str
    state: str  # PENDING, RUNNING, OK, DEGRADED, FAILED, SKIPPED
    started_at: float | None
    duration_s: float | None
    reason: str
    hint: str | None
    description: str


class ServiceStatus(TypedDict):
    name: str
    state: str  # ProcessState's name: STOPPED, STARTING, RUNNING, BACKOFF, ...
    pid: int | None
    uptime_s: float | None
    restarts: int
    last_exit: str | None  # "exited 7", "terminated by SIGKILL"
    spawnerr: str | None
    priority: int
    tail: NotRequired[list[str]]  # the last output lines; not with ``tail=False``


# -- session -------------------------------------------------------------------------------


class ExecLimitsDict(TypedDict):
    """What every agent process starts under (``ExecLimits.as_dict``)."""

    oom_score_adj: int
    nice: int
    nproc: int
    cgroup_procs: list[str]


class SessionInfo(TypedDict):
    """Where to attach: the ``session`` op's reply and the ``session.ready`` payload."""

    exists: bool
    socket: str
    id: str | None
    name: str | None
    agent_pane: str | None
    state: str
    reason: str | None
    hint: str | None
    # who a tmux client must run as: there once the agent user is known
    user: NotRequired[str]
    uid: NotRequired[int]
    gid: NotRequired[int]
    home: NotRequired[str]
    limits: NotRequired[ExecLimitsDict]
    seccomp_filter: NotRequired[str]  # the ``session`` op only, while the session exists


class PaneStatus(TypedDict):
    id: str
    index: int
    role: str | None
    command: str
    pid: int | None
    dead: bool
    dead_status: int | None
    dead_signal: str | None


class ClientStatus(TypedDict):
    tty: str
    pid: int | None
    uid: int | None
    term: str
    size: str
    since: int | None


class AgentTree(TypedDict):
    pid: int
    processes: int
    cpu_percent: float
    rss_bytes: int
    rss: str


class MountUsage(TypedDict):
    path: str
    mountpoint: str | None
    fstype: str | None
    total: int
    used: int
    free: int
    percent: float
    warn: bool
    bar: str


class SessionStatus(SessionInfo):
    policy: str
    cwd: str | None
    server_pid: int | None
    panes: list[PaneStatus]
    clients: list[ClientStatus]
    agent: AgentTree | None
    restarts: dict[str, int]  # "agent", "server"
    gave_up: bool
    mounts: list[MountUsage]


# -- network -------------------------------------------------------------------------------


class LastRefresh(TypedDict):
    at: float
    duration_s: float
    names: int
    ok: int
    failed: int
    addresses: int
    changed: bool
    all_failed: bool
    error: str | None


class FailingName(TypedDict):
    name: str
    error: str | None
    failures: int
    since: float | None
    kept: list[str]


class RefreshFigures(TypedDict):
    names: int
    addresses: int
    last_refresh: LastRefresh | None
    next_refresh_in_s: float | None
    refreshes: int
    set_swaps: int
    overruns: int
    failing: list[FailingName]


class DeniedRow(TypedDict):
    """A firewall counter of packets to an address it refused."""

    addr: str
    port: int
    proto: str
    packets: int
    last_seen: float  # wall clock
    seen: str  # "last" or "first": what ``last_seen`` is
    name: str | None


class RefusedName(TypedDict):
    """A name the DNS server refused."""

    name: str
    count: int
    first: float
    last: float
    client: str
    qtype: NotRequired[str]


class GrantStatus(TypedDict):
    """A temporary allowlist entry (``codetainer allow``)."""

    target: str
    kind: str
    expires_at: float
    expires_in_s: float
    by_uid: int


class DnsHealth(TypedDict):
    ok: bool
    reason: str
    latency_ms: float


class DnsGuardStatus(TypedDict):
    up: bool
    reason: str | None
    down_since: float | None
    revivals: int
    attempt: int
    recoveries: int
    next_attempt_in_s: float | None


class NetworkInactive(TypedDict):
    active: Literal[False]  # the network boot steps did not run


class NetworkActive(RefreshFigures):
    active: Literal[True]
    engine: str
    listen: str
    hook: str | None
    backend: str
    ipv6: str
    ipv6_reason: str | None
    inbound: str  # "tcp/8080,udp/5353", "" for none
    denied: list[DeniedRow]
    refused: list[RefusedName]
    grants: list[GrantStatus]
    degraded: str | None
    selftest_ok: bool | None
    dns_health: DnsHealth | None
    dns_guard: DnsGuardStatus | None
    hook_counts: NotRequired[dict[str, int]]


NetworkStatus = NetworkActive | NetworkInactive


class WhyDenied(TypedDict):
    proto: str
    port: int
    packets: int
    seen_ago: float
    seen: str


class WhyAddressDict(TypedDict):
    addr: str
    sets: list[str]
    allowed: bool
    denied: list[WhyDenied]
    names: list[str]


class WhyRequest(TypedDict):
    """The proxy's decision on one method of ``why URL``."""

    method: str
    url: str
    allowed: bool
    where: str | None
    rule: str
    reason: str
    credential: bool


class ProxyRefusal(TypedDict):
    """A request the policy proxy refused (``refused.json``, newest first)."""

    host: str
    method: str
    path: str
    rule: str
    where: str
    reason: str
    count: int
    first: float
    last: float


class WhyReply(TypedDict):
    """The ``why`` op's reply (``codetainer why HOST|IP|URL``)."""

    target: str
    kind: str  # "host" or "ip"
    verdict: str
    allowlisted: bool
    entry: str | None
    where: str | None
    rcode: str | None
    addresses: list[WhyAddressDict]
    refused: RefusedName | None
    grant: GrantStatus | None
    notes: list[str]
    requests: list[WhyRequest]
    proxy_refused: list[ProxyRefusal]


# -- limits --------------------------------------------------------------------------------


class CgroupMemory(TypedDict):
    max: int
    current: int | None


class CgroupPids(TypedDict):
    max: int
    current: int | None
    refused: int | None


class CgroupStatus(TypedDict):
    version: int
    dirs: dict[str, str]  # controller -> the agent's directory
    leaf: str | None
    memory: CgroupMemory | None
    pids: CgroupPids | None
    cpu_weight: int | None


class OomKills(TypedDict):
    count: int
    last: float | None
    command: str | None
    scope: str  # "agent" (its cgroup's counter) or "machine"
    source: str
    kernel_log: str | None  # None while the kernel log is read, else why it is not


class LimitsStatus(TypedDict):
    mode: str  # "cgroup v2", "cgroup v1", "rlimit only"
    no_cgroup: str | None  # why the agent has no cgroup of its own (None: it has)
    process: ExecLimitsDict
    cgroup: CgroupStatus | None
    oom_score_adj: dict[str, int | None]  # init, daemon, each service, agent
    oom_note: str | None
    oom_kills: OomKills | None


# -- proxy ---------------------------------------------------------------------------------


class ProxyStatus(TypedDict):
    state: str  # the proxy service's state, "absent" without one
    ports: list[int]
    requests: int
    refused_total: int
    refused: list[ProxyRefusal]
    error: NotRequired[str]  # refused.json could not be read
    degraded: NotRequired[str]
