"""Human-readable rendering of ``status`` (coloured on a TTY, plain otherwise)."""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the CLI's start-up)
if TYPE_CHECKING:
    from typing import Any

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


def step_line(step: dict[str, Any], color: bool = False) -> str:
    state = str(step.get("state", "?"))
    line = f"  {_state(f'{state:<8}', color)} {step.get('name', '?'):<18} {_dur(step.get('duration_s')):>7}"
    if step.get("reason"):
        line += f"  {step['reason']}"
    if step.get("hint") and state in ("FAILED", "DEGRADED"):
        line += "\n" + " " * 36 + paint(f"-> {step['hint']}", "bold", color)
    return line


def render_status(st: dict[str, Any], color: bool = False) -> str:
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
    net = st.get("network")
    if isinstance(net, dict) and net.get("text"):
        out.append(paint("network", "bold", color))
        out.extend("  " + ln for ln in str(net["text"]).splitlines())
    proxy = st.get("proxy")
    if isinstance(proxy, dict):
        out.append(paint("proxy", "bold", color))
        out.extend(render_proxy(proxy))
    sess = st.get("session")
    if isinstance(sess, dict):
        out.append(paint("session", "bold", color))
        out.extend(render_session(sess, color))
    limits = st.get("limits")
    if isinstance(limits, dict) and limits.get("text"):
        out.append(paint("limits", "bold", color))
        out.extend(render_limits(limits, color))
    return "\n".join(out)


def render_proxy(px: dict[str, Any], now: float | None = None) -> list[str]:
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


def render_limits(lim: dict[str, Any], color: bool = False) -> list[str]:
    """What the agent may consume and who the OOM killer takes (codetainer.limits)."""
    lines = [f"  {lim['text']}"]
    cg = lim.get("cgroup") or {}
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


def render_session(s: dict[str, Any], color: bool = False) -> list[str]:
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
