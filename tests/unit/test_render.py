"""Human rendering of `codetainer status`."""

from __future__ import annotations

from codetainer.cli.render import render_allow, render_network, render_status

STATUS = {
    "state": "DEGRADED", "version": "0.1.0", "reasons": ["repository: clone failed"],
    "daemon": {"pid": 2, "uptime_s": 3725, "rss_bytes": 30 * 2**20, "init_rss_bytes": 10 * 2**20,
               "boot_s": 0.42},
    "steps": [
        {"name": "secrets", "state": "OK", "duration_s": 0.0003, "reason": "present"},
        {"name": "repository", "state": "DEGRADED", "duration_s": 2.5, "reason": "clone failed",
         "hint": "check REPO_URL"},
    ],
    "services": [{"name": "dns", "state": "RUNNING", "pid": 7, "uptime_s": 60, "restarts": 1,
                  "last_exit": "killed by SIGKILL", "tail": ["started"]}],
    "network": {"active": True, "engine": "dnsmasq", "listen": "127.0.0.53", "hook": None,
                "backend": "nftables", "ipv6": "deny", "ipv6_reason": None, "inbound": "",
                "names": 2, "addresses": 3, "last_refresh": None, "next_refresh_in_s": 30.0,
                "refreshes": 1, "set_swaps": 1, "overruns": 0, "failing": [], "denied": [],
                "refused": [], "grants": [], "degraded": None, "selftest_ok": True,
                "dns_health": None, "dns_guard": None},
    "limits": {"mode": "rlimit only", "no_cgroup": "no cgroup filesystem is mounted",
               "process": {"nproc": 400, "nice": 10, "oom_score_adj": 1000, "cgroup_procs": []},
               "cgroup": None, "oom_score_adj": {"daemon": -999, "agent": 1000},
               "oom_note": None, "oom_kills": None},
    "session": {"id": "$0", "name": "fix-parser", "state": "RUNNING",
                "restarts": {"agent": 2, "server": 0},
                "panes": [{"index": 0, "role": "agent", "command": "claude", "pid": 40},
                          {"index": 1, "role": "shell", "command": "bash", "pid": 41,
                           "dead": True}],
                "agent": {"processes": 3, "cpu_percent": 1.5, "rss": "200M"},
                "clients": [{"tty": "/dev/pts/1"}],
                "mounts": [{"path": "/workspace", "bar": "[####----] 50%", "warn": True}]},
}


def test_plain_rendering_has_every_section_and_no_escapes() -> None:
    text = render_status(STATUS, color=False)
    assert "\x1b[" not in text
    assert text.splitlines()[0] == ("codetainer 0.1.0: DEGRADED  (pid 2, up 1h02m, rss 40 MiB, "
                                    "boot 420ms)")
    assert "-> check REPO_URL" in text
    assert "RUNNING  dns" in text and "restarts 1" in text and "last: killed by SIGKILL" in text
    assert "network\n  DNS dnsmasq on 127.0.0.53, firewall nftables, IPv6 deny, inbound none\n" \
        "  2 names, 3 addresses; next in 30s\n" in text  # rendered here: the daemon sends data
    assert "limits\n  rlimit only (no writable cgroup: no cgroup filesystem is mounted)\n" in text
    assert "$0 fix-parser  restarts: agent 2, tmux 0" in text
    assert "pane 1 shell  bash pid 41 (dead)" in text
    assert "agent tree: 3 processes, cpu 1.5 %, rss 200M" in text
    assert "attached clients: 1" in text
    # past 90 % a mount says so in words too (not only in red, which a pipe loses)
    assert "/workspace     [####----] 50%  FULL SOON: free space, the agent is about to fail" \
        in text


def test_colour_on_a_tty() -> None:
    text = render_status(STATUS, color=True)
    assert "\x1b[33mDEGRADED\x1b[0m" in text
    assert "\x1b[31m[####----] 50%  FULL SOON" in text  # a nearly full tmpfs stands out


def test_a_section_that_failed_is_not_rendered_as_data() -> None:
    text = render_status({**STATUS, "network": {"error": "KeyError: 'x'"},
                          "limits": {"error": "OSError: gone"}}, color=False)
    assert "network" not in text.splitlines() and "limits" not in text.splitlines()
    assert render_network({"active": False}) == ["not set up (the network boot steps did not run)"]


def test_allow_reply_is_said_by_the_cli_from_its_data() -> None:
    """The daemon's ``allow`` reply carries the grant and its duration, no text."""
    import time

    expires = time.time() + 5400
    reply = {"ok": True, "reason": "grant", "duration_s": 5400.0,
             "grant": {"target": "extra.test:443", "kind": "host", "expires_at": expires,
                       "expires_in_s": 5399.9, "by_uid": 0}}
    until = time.strftime("%H:%M:%S", time.localtime(expires))
    assert render_allow(reply) == (f"allowed extra.test:443 for 90m (until {until}); "
                                   "it expires on its own")
    assert render_allow({**reply, "duration_s": 4.0}).startswith("allowed extra.test:443 for 4s ")
