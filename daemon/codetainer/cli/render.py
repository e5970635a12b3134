"""Every line a person reads of the daemon's replies, rendered here from their data
(:mod:`codetainer.status`): ``codetainer status`` (coloured on a TTY, plain otherwise),
``codetainer wait``, ``codetainer why``, and what ``codetainer attach`` prints (boot
progress, the status without a terminal). The daemon sends data only.

Imported by the commands that render, never on ``attach``'s fast path; it imports
nothing of the daemon's at start-up (``why`` alone asks ``network.model`` which
addresses are internal).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the CLI's start-up)
if TYPE_CHECKING:
    from typing import Any

    from codetainer.status import (
        LimitsStatus,
        NetworkStatus,
        ProxyStatus,
        SessionInfo,
        SessionStatus,
        StatusReply,
        StepStatus,
        WhyReply,
    )

COLORS = {"green": "32", "yellow": "33", "red": "31", "dim": "2", "bold": "1", "cyan": "36"}
STATE_COLOR = {
    "READY": "green", "RUNNING": "green", "OK": "green",
    "DEGRADED": "yellow", "BACKOFF": "yellow", "STARTING": "yellow", "STOPPING": "yellow",
    "BOOTING": "cyan", "PENDING": "dim", "SKIPPED": "dim", "STOPPED": "dim", "EXITED": "yellow",
    "FAILED": "red", "FATAL": "red",
}


def paint(text: str, color: str | None, enabled: bool) -> str:
    if not enabled or not color:
        return text
    return f"\x1b[{COLORS[color]}m{text}\x1b[0m"


def _state(s: str, color: bool) -> str:
    return paint(s, STATE_COLOR.get(s), color)


def _dur(v: Any) -> str:
    if v is None:
        return ""
    v = float(v)
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.2f}s"


def _uptime(v: Any) -> str:
    if v is None:
        return "-"
    s = int(v)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _span(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_span(seconds)} ago"


def step_line(step: StepStatus, color: bool = False) -> str:
    state = str(step.get("state", "?"))
    line = f"  {_state(f'{state:<8}', color)} {step.get('name', '?'):<18} {_dur(step.get('duration_s')):>7}"
    if step.get("reason"):
        line += f"  {step['reason']}"
    if step.get("hint") and state in ("FAILED", "DEGRADED"):
        line += "\n" + " " * 36 + paint(f"-> {step['hint']}", "bold", color)
    return line


def render_status(st: StatusReply, color: bool = False) -> str:
    out: list[str] = []
    d = st.get("daemon", {})
    rss = (d.get("rss_bytes") or 0) + (d.get("init_rss_bytes") or 0)
    out.append(
        f"codetainer {st.get('version', '')}: {_state(str(st.get('state')), color)}"
        f"  (pid {d.get('pid')}, up {_uptime(d.get('uptime_s'))}, rss {rss / 2**20:.0f} MiB"
        + (f", boot {_dur(d.get('boot_s'))}" if d.get("boot_s") is not None else "") + ")"
    )
    out.append(paint("boot", "bold", color))
    for step in st.get("steps", []):
        out.append(step_line(step, color))
    out.append(paint("services", "bold", color))
    for s in st.get("services", []):
        sstate = str(s["state"])
        line = (f"  {_state(f'{sstate:<8}', color)} {s['name']:<16} "
                f"pid {s.get('pid') or '-':<7} up {_uptime(s.get('uptime_s')):<6} "
                f"restarts {s.get('restarts', 0)}")
        if s.get("last_exit"):
            line += f"  last: {s['last_exit']}"
        if s.get("spawnerr"):
            line += f"  ({s['spawnerr']})"
        out.append(line)
        for t in s.get("tail") or []:
            out.append(paint(f"      | {t}", "dim", color))
    # a section whose building failed is {"error": ...}; network and limits then say nothing
    net = _section(st, "network")
    if net is not None and "active" in net:
        out.append(paint("network", "bold", color))
        out.extend("  " + ln for ln in render_network(net))
    proxy = _section(st, "proxy")
    if proxy is not None:
        out.append(paint("proxy", "bold", color))
        out.extend(render_proxy(proxy))
    sess = st.get("session")
    if isinstance(sess, dict):
        out.append(paint("session", "bold", color))
        out.extend(render_session(sess, color))
    limits = _section(st, "limits")
    if limits is not None and "mode" in limits:
        out.append(paint("limits", "bold", color))
        out.extend(render_limits(limits, color))
    return "\n".join(out)


def _section(st: StatusReply, name: str) -> Any:
    """A part's section when it is an object (its data, or ``{"error": ...}``), else None."""
    value = st.get(name)
    return value if isinstance(value, dict) else None


def render_proxy(px: ProxyStatus, now: float | None = None) -> list[str]:
    """The ``proxy`` section: the policy proxy's state and what it refused, newest first."""
    now = time.time() if now is None else now
    ports = ", ".join(str(p) for p in px.get("ports") or [])
    lines = [f"  {px.get('state', '?')} on 127.0.0.1:{ports or '-'}, "
             f"{px.get('requests', 0)} requests, {px.get('refused_total', 0)} refused"]
    if px.get("degraded"):
        lines.append(f"  DEGRADED: {px['degraded']}")
    for r in (px.get("refused") or [])[:10]:
        if not isinstance(r, dict):
            continue
        last = r.get("last") or 0
        ago = f"{max(0, now - float(last)):.0f}s ago" if last else "-"
        by = " ".join(str(x) for x in (r.get("where"), r.get("rule")) if x) or "the policy"
        lines.append(f"  refused {r.get('method', '?')} {r.get('host', '?')}{r.get('path', '')} "
                     f"x{r.get('count', 0)}, last {ago}: {by}")
        if r.get("reason"):
            lines.append(f"    {r['reason']}")
    return lines


def _mib(n: Any) -> str:
    return "?" if not isinstance(n, int) else f"{n / 2**20:.0f} MiB"


def limits_mode(lim: LimitsStatus) -> str:
    """``cgroup v2 (DIR)``, ``cgroup v1 (memory DIR, pids DIR)`` or ``rlimit only (no
    writable cgroup: WHY)``: how the agent is confined."""
    cg = lim.get("cgroup")
    if not cg:
        return f"rlimit only (no writable cgroup: {lim.get('no_cgroup')})"
    dirs = cg.get("dirs") or {}
    if cg.get("version") == 2:
        return f"cgroup v2 ({next(iter(dirs.values()), '?')})"
    return "cgroup v1 (" + ", ".join(f"{c} {d}" for c, d in dirs.items()) + ")"


def render_limits(lim: LimitsStatus, color: bool = False) -> list[str]:
    """What the agent may consume and who the OOM killer takes (codetainer.limits)."""
    lines = [f"  {limits_mode(lim)}"]
    cg: dict[str, Any] = dict(lim.get("cgroup") or {})
    parts = []
    if cg.get("memory"):
        parts.append(f"memory {_mib(cg['memory'].get('current'))} of {_mib(cg['memory']['max'])}")
    if cg.get("pids"):
        pids = cg["pids"]
        parts.append(f"tasks {pids.get('current', '?')} of {pids['max']}"
                     + (f" (forks refused: {pids['refused']})" if pids.get("refused") else ""))
    if cg.get("cpu_weight") is not None:
        parts.append(f"cpu weight {cg['cpu_weight']} (the daemon's 100)")
    if parts:
        lines.append("  agent cgroup: " + ", ".join(parts))
    proc = lim.get("process") or {}
    lines.append(f"  each agent process: nproc {proc.get('nproc')}, nice {proc.get('nice')}, "
                 f"oom_score_adj {proc.get('oom_score_adj')}")
    scores = lim.get("oom_score_adj") or {}
    lines.append("  oom_score_adj: " + ", ".join(f"{k} {v}" for k, v in scores.items()))
    if lim.get("oom_note"):
        lines.append(paint(f"  ({lim['oom_note']})", "dim", color))
    oom = lim.get("oom_kills")
    if isinstance(oom, dict):
        where = "the agent's" if oom.get("scope") == "agent" else "machine-wide"
        if not oom.get("count"):
            lines.append(f"  OOM kills ({where}): none")
        else:
            when = time.strftime("%H:%M:%S", time.localtime(float(oom.get("last") or 0)))
            what = oom.get("command") or \
                f"command unknown: {oom.get('kernel_log') or 'not in the kernel log'}"
            lines.append(paint(f"  OOM kills ({where}): {oom['count']}, last at {when} ({what})",
                               "red", color))
    return lines


def render_session(s: SessionStatus, color: bool = False) -> list[str]:
    state = str(s.get("state", "?"))
    restarts = s.get("restarts") or {}
    lines = [f"  {_state(f'{state:<8}', color)} {s.get('id') or '-'} {s.get('name') or ''}"
             f"  restarts: agent {restarts.get('agent', 0)}, tmux {restarts.get('server', 0)}"
             + (f"  ({s['reason']})" if s.get("reason") else "")]
    for pane in s.get("panes") or []:
        dead = " (dead)" if pane.get("dead") else ""
        lines.append(f"    pane {pane.get('index')} {pane.get('role', ''):<6} "
                     f"{pane.get('command', '')} pid {pane.get('pid')}{dead}")
    agent = s.get("agent")
    if isinstance(agent, dict):
        lines.append(f"    agent tree: {agent.get('processes')} processes, "
                     f"cpu {agent.get('cpu_percent')} %, rss {agent.get('rss')}")
    clients = s.get("clients") or []
    lines.append(f"    attached clients: {len(clients)}")
    for m in s.get("mounts") or []:
        bar = str(m.get("bar", "")) + ("  FULL SOON: free space, the agent is about to fail"
                                       if m.get("warn") else "")
        lines.append(f"    {m.get('path', ''):<14} " + paint(bar, "red" if m.get("warn") else None,
                                                          color))
    return lines


# -- network (status's section, and ``why``) -----------------------------------------------


def render_network(st: NetworkStatus, now: float | None = None) -> list[str]:
    """The ``network`` section of status, one line per fact (unindented)."""
    if not st.get("active"):
        return ["not set up (the network boot steps did not run)"]
    now = time.time() if now is None else now
    g: dict[str, Any] = dict(st)  # an older or newer daemon may leave a field out
    lines = [f"DNS {g['engine']} on {g['listen']}"
             + (f" (hook {g['hook']})" if g.get("hook") else "")
             + f", firewall {g['backend']}, IPv6 {g['ipv6']}"
             + (f" ({g['ipv6_reason']})" if g.get("ipv6_reason") else "")
             + f", inbound {g.get('inbound') or 'none'}"]
    last = g.get("last_refresh")
    refresh = f"{g['names']} names, {g['addresses']} addresses"
    if last:
        refresh += (f"; last refresh {_ago(now - last['at'])} in {last['duration_s'] * 1000:.0f} ms "
                    f"({last['ok']} ok, {last['failed']} failed)")
    if g.get("next_refresh_in_s") is not None:
        refresh += f"; next in {g['next_refresh_in_s']:.0f}s"
    lines.append(refresh)
    if g.get("degraded"):
        lines.append(f"DEGRADED: {g['degraded']}")
    guard = g.get("dns_guard") or {}
    if guard.get("revivals"):
        lines.append(f"DNS server: {guard['revivals']} start(s) by codetainerd after the supervisor "
                     f"gave up; answered again after {guard['recoveries']} outage(s)")
    if g.get("failing"):
        lines.append("failing: " + ", ".join(f"{f['name']} ({f['error']} x{f['failures']})"
                                             for f in g["failing"][:5]))
    for d in (g.get("denied") or [])[:5]:
        name = f" ({d['name']})" if d.get("name") else ""
        lines.append(f"denied {d['addr']}:{d['port']}/{d['proto']}{name} x{d['packets']}, "
                     f"{d.get('seen', 'last')} {_ago(now - d['last_seen'])}")
    for r in (g.get("refused") or [])[:5]:
        lines.append(f"refused {r['name']} x{r['count']}, last {_ago(now - r['last'])}")
    for gr in g.get("grants") or []:
        lines.append(f"grant {gr['target']}: expires in {_span(gr['expires_in_s'])}")
    return lines


def render_allow(r: dict[str, Any]) -> str:
    """The ``allow`` reply: what was granted, for how long, until when."""
    import time

    grant = r.get("grant") or {}
    until = time.strftime("%H:%M:%S", time.localtime(float(grant.get("expires_at") or 0)))
    return (f"allowed {grant.get('target')} for {_span(float(r.get('duration_s') or 0))} "
            f"(until {until}); it expires on its own")


def render_why(r: WhyReply, now: float | None = None) -> str:
    """``codetainer why HOST|IP|URL``: the verdict and what it rests on, one screen."""
    from codetainer.network.model import is_internal

    now = time.time() if now is None else now
    kind = r.get("kind")
    out = [f"{r.get('target')}: {r.get('verdict')}"]
    if r.get("entry") is not None:
        out.append(f"  allowlist: {r['entry']} ({r.get('where')})")
    elif kind == "host":
        out.append("  allowlist: no entry (add it to domains.conf, or `codetainer allow NAME`)")
    grant = r.get("grant")
    if grant is not None:
        out.append(f"  temporary grant: expires in {_span(grant['expires_in_s'])}")
    addresses = r.get("addresses") or []
    if kind == "host":
        if addresses:
            out.append(f"  resolves to: {', '.join(a['addr'] for a in addresses)}")
        elif r.get("rcode"):
            out.append(f"  resolves to: nothing ({r['rcode']})")
    for a in addresses:
        sets = ", ".join(a["sets"]) if a.get("sets") else "no set"
        line = f"  {a['addr']}: {sets}"
        if is_internal(a["addr"]) and not a.get("allowed"):
            line += " (internal address: a name never opens it, only an explicit network entry)"
        if a.get("names") and kind == "ip":
            line += f"; resolved from {', '.join(a['names'])}"
        out.append(line)
        for d in (a.get("denied") or [])[:5]:
            out.append(f"    denied {d['packets']}x {d['proto']}/{d['port']}, "
                       f"{d.get('seen', 'last')} {_ago(d['seen_ago'])}")
    refused = r.get("refused")
    if refused is not None:
        out.append(f"  DNS refused it {refused['count']}x, last {_ago(now - refused['last'])}")
    for q in r.get("requests") or []:
        verdict = "allowed" if q["allowed"] else "REFUSED"
        by = q["where"] or "no allowlist entry"
        cred = ", the proxy adds the credential" if q.get("credential") else ""
        out.append(f"  proxy: {q['method']} {q['url']}: {verdict} by {by} {q['rule']}{cred}")
        if q.get("reason"):
            out.append(f"    {q['reason']}")
    for p in (r.get("proxy_refused") or [])[:5]:
        out.append(f"  proxy refused {p['method']} {p['host']}{p['path']} {p['count']}x, "
                   f"last {_ago(now - p['last'])}: {p.get('where') or 'no entry'}")
    out.extend(f"  note: {n}" for n in r.get("notes") or [])
    return "\n".join(out[:24])


# -- attach: boot progress and the status without a terminal -------------------------------

_MARKS = {"OK": "[ OK ]", "FAILED": "[FAIL]", "DEGRADED": "[WARN]", "SKIPPED": "[SKIP]",
          "RUNNING": "[ .. ]", "PENDING": "[    ]"}
#: the states a step ends in
FINAL = frozenset({"OK", "FAILED", "DEGRADED", "SKIPPED"})


def progress_line(ev: StepStatus) -> str:
    """A boot step as ``attach`` prints it while following the boot: ``[ OK ] name 0.42s``."""
    state = str(ev.get("state", ""))
    line = f"{_MARKS.get(state, '[ ?? ]')} {ev.get('name', '?')}"
    duration = ev.get("duration_s")
    if duration is not None and state in FINAL - {"SKIPPED"}:
        line += f" {float(duration):.2f}s"
    if ev.get("reason"):
        line += f"  {ev['reason']}"
    if ev.get("hint") and state in ("FAILED", "DEGRADED"):
        line += f"\n       fix: {ev['hint']}"
    return line


def session_failure(info: SessionInfo) -> str:
    """Why the agent's session could not start, and the fix when there is one."""
    reason = str(info.get("reason") or "unknown reason")
    return reason + (f" (fix: {info['hint']})" if info.get("hint") else "")


def render_brief(status: StatusReply | None, session: SessionInfo | None) -> str:
    """What ``attach`` prints when stdin is not a terminal: the boot, its steps and
    where the session is (``session`` when there is no status)."""
    lines: list[str] = []
    if status is not None:
        lines.append(f"boot: {status.get('state', '?')}")
        lines.extend("  " + progress_line(s) for s in status.get("steps") or [])
        session = status.get("session") or session
    if session:
        if session.get("exists"):
            lines.append(f"session: {session.get('id')} ({session.get('name')}) on "
                         f"{session.get('socket')}; attach from a terminal with "
                         f"`codetainer attach`")
        else:
            lines.append("session: not running" +
                         (f" ({session['reason']})" if session.get("reason") else ""))
    return "\n".join(lines)
