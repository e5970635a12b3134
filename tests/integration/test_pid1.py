"""codetainerd as a real init: PID 1 in its own namespaces, and a subreaper otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from codetainer.sandbox.daemonproc import DaemonProc, running, zombies

pytestmark = pytest.mark.integration

LOOPER = "while :; do sleep 0.05; done"


def prog(name: str, command: str, **opts: object) -> str:
    lines = [f"[program:{name}]", f"command={command}"]
    opts.setdefault("startsecs", 0)
    lines += [f"{k}={v}" for k, v in opts.items()]
    return "\n".join(lines) + "\n"


def conf(*progs: str) -> str:
    return "[supervisord]\n" + "\n".join(progs)


def orphans_done(d: DaemonProc) -> bool:
    """The service has exec'd its last command (``sleep 1000``: every orphan it makes is
    made) and, after that, the init has no child but the daemon: every orphan is gone,
    reaped (a zombie still counts as a child)."""
    try:
        init = psutil.Process(d.init_pid)
        daemons = [p for p in init.children() if p.name() not in ("sh", "sleep")]
        services = [c for p in daemons for c in p.children()]
        if not services or any(c.name() != "sleep" for c in services):
            return False
        return {p.pid for p in init.children()} == {p.pid for p in daemons}
    except psutil.Error:
        return False


def pending_at(pid: int, sig: int) -> bool:
    """``sig`` is pending at ``pid``: sent, not yet taken (the init blocks the signals it
    forwards and takes them one at a time)."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    return any(int(fields[f].strip(), 16) & (1 << (sig - 1)) for f in ("ShdPnd", "SigPnd"))


def test_hundred_orphans_reaped_as_pid1(tmp_path: Path) -> None:
    spawner = ("/bin/sh -c 'for i in $(seq 100); do /bin/sh -c \"sleep 0.3 &\"; done; "
               "exec sleep 1000'")
    with running(tmp_path, conf(prog("spawner", spawner))) as d:
        d.wait_until(lambda: d.service("spawner")["state"] == "RUNNING", what="RUNNING")
        # The orphans were re-parented to our PID 1 ...
        init = psutil.Process(d.init_pid)
        d.wait_until(lambda: len([p for p in init.children() if p.name() == "sleep"]) >= 50,
                     timeout=5, what="orphans re-parented to PID 1")
        # ... and once they die, nothing is left unreaped.
        d.wait_until(lambda: orphans_done(d), timeout=5, what="every orphan dead and reaped")
        assert zombies(d.descendants()) == []
        assert [p for p in init.children() if p.name() == "sleep"] == []
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


def test_double_fork_leaves_no_zombie(tmp_path: Path) -> None:
    cmd = "/bin/sh -c '(/bin/sh -c \"sleep 0.2\" &); (/bin/sh -c \"exit 3\" &); exec sleep 1000'"
    with running(tmp_path, conf(prog("df", cmd))) as d:
        d.wait_until(lambda: d.service("df")["state"] == "RUNNING", what="RUNNING")
        d.wait_until(lambda: orphans_done(d), timeout=5, what="both orphans dead and reaped")
        assert zombies(d.descendants()) == []
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


def test_sigterm_stops_services_in_reverse_priority_and_exits_0(tmp_path: Path) -> None:
    order = tmp_path / "order"
    progs = [
        prog(name, f"/bin/sh -c 'trap \"echo {name} >> {order}; exit 0\" TERM; {LOOPER}'",
             priority=prio)
        for name, prio in (("first", 10), ("second", 20), ("third", 30))
    ]
    with running(tmp_path, conf(*progs)) as d:
        d.wait_until(lambda: all(s["state"] == "RUNNING" for s in d.status()["services"]),
                     what="all RUNNING")
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        assert order.read_text().split() == ["third", "second", "first"]
        names = [e["event"] for e in d.events()]
        assert "shutdown_complete" in names


def test_trapping_service_is_killed_at_stopwaitsecs(tmp_path: Path) -> None:
    stubborn = prog("stubborn", f"/bin/sh -c 'trap \"\" TERM; {LOOPER}'", stopwaitsecs=1)
    with running(tmp_path, conf(stubborn)) as d:
        d.wait_until(lambda: d.service("stubborn")["state"] == "RUNNING", what="RUNNING")
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        sigs = [(e["signal"], e["timestamp"]) for e in d.events()
                if e.get("event") == "service_signal"]
        assert [s for s, _ in sigs] == ["SIGTERM", "SIGKILL"]
        from datetime import datetime

        t = [datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() for _, ts in sigs]
        assert t[1] - t[0] == pytest.approx(1.0, abs=0.3)


def test_grandchild_ignoring_sigterm_does_not_survive_shutdown(tmp_path: Path) -> None:
    pidfile = tmp_path / "gc.pid"
    cmd = (f"/bin/sh -c '(trap \"\" TERM; exec sleep 1000) & echo $! > {pidfile}; "
           "exec sleep 1000'")
    # Not PID 1: otherwise the kernel would kill the namespace for us and prove nothing.
    with running(tmp_path, conf(prog("parent", cmd)), pid1=False) as d:
        d.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
        gc = int(pidfile.read_text())
        assert psutil.pid_exists(gc)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        assert not psutil.pid_exists(gc) or psutil.Process(gc).status() == psutil.STATUS_ZOMBIE


def test_subreaper_reaps_orphans_when_not_pid1(tmp_path: Path) -> None:
    pidfile = tmp_path / "orphan.pid"
    cmd = f"/bin/sh -c '/bin/sh -c \"sleep 0.5 & echo \\$! > {pidfile}\"; exec sleep 1000'"
    with running(tmp_path, conf(prog("o", cmd)), pid1=False) as d:
        d.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
        orphan = psutil.Process(int(pidfile.read_text()))
        # Re-parented to the daemon's init process, not to the host's init.
        assert orphan.ppid() == d.init_pid
        orphan_pid = orphan.pid
        d.wait_until(lambda: not psutil.pid_exists(orphan_pid), timeout=3, what="orphan reaped")
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


def test_exit_status_integrity_under_orphan_storm(tmp_path: Path) -> None:
    seven = prog("seven", "/bin/sh -c 'exit 7'", autorestart="true", startretries=1000)
    storm = prog("storm", "/bin/sh -c 'while :; do for i in 1 2 3 4 5; do "
                 "(/bin/sh -c \"exit 3\" &); done; sleep 0.005; done'")
    with running(tmp_path, conf(seven, storm)) as d:
        def exits() -> list[str]:
            return [e["exit"] for e in d.events()
                    if e.get("event") == "service_exited" and e.get("service") == "seven"]

        d.wait_until(lambda: len(exits()) >= 200, timeout=60, what="200 exits")
        d.call("stop", name="seven")
        recorded = exits()
        assert len(recorded) >= 200
        assert set(recorded) == {"exited 7"}, set(recorded)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0


@pytest.mark.parametrize("pid1", [True, False])
def test_works_when_started_with_sigint_ignored(tmp_path: Path, pid1: bool) -> None:
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

    status_file = tmp_path / "child-status"
    probe = prog("probe", f"/bin/sh -c 'grep -E \"^Sig(Blk|Ign)\" /proc/self/status > {status_file}; "
                 f"ls /proc/self/fd >> {status_file}; exec sleep 1000'")
    d = DaemonProc(tmp_path, conf(probe), pid1=pid1)
    d.proc.kill()  # restart it below with the hostile signal state
    d.proc.wait()
    d.log_file.close()
    argv = ["/usr/bin/env", *d.proc.args]  # type: ignore[misc]
    env = {"PATH": os.environ["PATH"], "CODETAINER_RUN_DIR": str(tmp_path / "run")}
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=ignore_sigint, start_new_session=True)
        d.log_file = log
        try:
            d.wait_socket()
            d.wait_until(lambda: status_file.exists() and "fd" not in status_file.read_text()
                         and len(status_file.read_text().split("\n")) > 3, what="probe output")
            text = status_file.read_text()
            assert "SigBlk:\t0000000000000000" in text
            assert "SigIgn:\t0000000000000000" in text
            fds = sorted(int(x) for x in text.splitlines() if x.isdigit())
            assert fds == [0, 1, 2, 3]  # stdio and the fd ls used to list the directory
            d.signal(signal.SIGINT)
            assert d.wait() == 0
        finally:
            d.close()


def test_second_sigterm_forces_exit(tmp_path: Path) -> None:
    stubborn = prog("stubborn", f"/bin/sh -c 'trap \"\" TERM; {LOOPER}'", stopwaitsecs=30)
    with running(tmp_path, conf(stubborn)) as d:
        d.wait_until(lambda: d.service("stubborn")["state"] == "RUNNING", what="RUNNING")
        d.signal(signal.SIGTERM)
        d.wait_until(lambda: "shutdown_begin" in d.log(), what="shutdown begun")
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait() == 130
        assert time.monotonic() - t0 < 2


def test_bad_services_file_exits_with_reserved_code(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, "[supervisord]\n[program:x]\nstartsecs=abc\ncommand=/bin/true\n")
    try:
        assert d.wait(10) == 78
        [halt] = [e for e in d.events() if e.get("event") == "daemon_halt"]
        assert halt["exit_code"] == 78
        assert str(d.conf) in halt["reason"] and "program:x" in halt["reason"], halt
    finally:
        d.close()


def test_every_forwarded_signal_is_handled_and_survived(tmp_path: Path) -> None:
    """As PID 1 a signal with no handler is dropped by the kernel; in the daemon one with
    the default action would kill it. Each signal the init forwards does what README says
    and leaves the daemon and its service running."""
    env = {"CODETAINER_LOG_LEVEL": "info", "CODETAINER_LOG_FORMAT": "json"}
    d = DaemonProc(tmp_path, conf(prog("idle", "sleep 1000")), env=env)
    try:
        d.wait_socket()
        d.wait_until(lambda: d.service("idle")["state"] == "RUNNING", what="RUNNING")
        pid = d.service("idle")["pid"]
        def count(event: str) -> int:
            return sum(e.get("event") == event for e in d.events())

        init = d.init_pid
        # Each signal's effect, waited for. SIGWINCH has none: the init has taken it (its
        # forward follows at once), and the next SIGUSR2, forwarded after it, is handled.
        for sig, handled in ((signal.SIGUSR1, lambda: count("status_snapshot") == 1),
                             (signal.SIGUSR2, lambda: count("log_level_changed") == 1),
                             (signal.SIGWINCH, lambda: not pending_at(init, signal.SIGWINCH)),
                             (signal.SIGUSR2, lambda: count("log_level_changed") == 2)):
            d.signal(sig)
            d.wait_until(handled, what=f"{signal.Signals(sig).name} handled")
            assert d.proc.poll() is None, (sig, d.log()[-2000:])
        events = [e["event"] for e in d.events()]
        assert "status_snapshot" in events
        levels = [e["log_level"] for e in d.events() if e["event"] == "log_level_changed"]
        assert levels == ["debug", "info"]  # SIGUSR2 toggles debug on, then back
        st = d.status()
        assert st["daemon"]["pid"] and d.service("idle")["pid"] == pid  # nothing restarted
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.close()


@pytest.mark.parametrize(("extra_args", "env", "message"), [
    (["--bogus"], {}, "codetainerd: error: unrecognized arguments: --bogus"),
    (["--steps", "nope"], {}, "codetainerd: unknown boot step(s) nope; known: secrets"),
    ([], {"CODETAINER_SHUTDOWN_TIMEOUT": "soon"},
     "codetainerd: CODETAINER_SHUTDOWN_TIMEOUT='soon' is not valid: set it to a number of seconds"),
    ([], {"CODETAINER_IPV6": "yes"},
     "codetainerd: CODETAINER_IPV6='yes' is not valid: use one of auto, deny, fly, allowlist"),
    # these failed the boot (FAILED) or only a step (DEGRADED) late; now all exit 64 at start
    ([], {"CODETAINER_AGENT_PIDS": "10"},
     "codetainerd: CODETAINER_AGENT_PIDS='10' is not valid: set it to a number of processes"),
    ([], {"CODETAINER_CLONE_TIMEOUT": "5m"},
     "codetainerd: CODETAINER_CLONE_TIMEOUT='5m' is not valid: set it to a number of seconds"),
    ([], {"CODETAINER_READONLY_ROOT": "maybe"},
     "codetainerd: CODETAINER_READONLY_ROOT='maybe' is not valid: use one of 1, true, yes, on, 0"),
    ([], {"CODETAINER_UPSTREAMS": "dns.google"},
     "codetainerd: CODETAINER_UPSTREAMS='dns.google' is not valid: upstream resolver 'dns.google'"),
    ([], {"CODETAINER_HOME_SIZE": "1g,uid=0"},
     "codetainerd: CODETAINER_HOME_SIZE='1g,uid=0' is not valid: set it to a tmpfs size"),
    ([], {"CODETAINER_PLUGINS": "ok@m,--evil"},
     "codetainerd: CODETAINER_PLUGINS='ok@m,--evil' is not valid: '--evil' is not a plugin"),
], ids=["unknown-option", "unknown-step", "bad-setting", "bad-ipv6", "bad-limit", "bad-clone",
        "bad-switch", "bad-network-text", "bad-tmpfs-size", "bad-plugins"])
def test_bad_command_line_or_setting_exits_64(tmp_path: Path, extra_args: list[str],
                                              env: dict[str, str], message: str) -> None:
    d = DaemonProc(tmp_path, conf(prog("idle", "sleep 1000")), extra_args=extra_args, env=env)
    try:
        assert d.wait(10) == 64, d.log()
        assert message in d.log()
        assert "daemon_started" not in d.log()  # refused before doing anything
    finally:
        d.close()


@pytest.mark.parametrize("what", ["socket", "run_dir"])
def test_unusable_runtime_dir_or_socket_exits_71(tmp_path: Path, what: str) -> None:
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("not a directory\n")
    if what == "socket":
        target = blocker / "control.sock"
        kw: dict[str, object] = {"extra_args": ["--socket", str(target)]}
        expected = f"cannot create control socket {target}: "
    else:
        target = blocker / "run"
        kw = {"env": {"CODETAINER_RUN_DIR": str(target)}}
        expected = f"cannot create runtime directory {target} (CODETAINER_RUN_DIR): "
    d = DaemonProc(tmp_path, conf(prog("idle", "sleep 1000")), **kw)  # type: ignore[arg-type]
    try:
        assert d.wait(10) == 71, d.log()
        [halt] = [e for e in d.events() if e.get("event") == "daemon_halt"]
        assert halt["exit_code"] == 71
        assert halt["reason"].startswith(expected), halt
        assert str(blocker) in halt["reason"]
        assert blocker.read_text() == "not a directory\n"  # left as it was
        assert not any(e.get("event") == "service_spawned" for e in d.events())
    finally:
        d.close()


def test_heap_is_frozen_once_booted_and_status_keeps_answering(tmp_path: Path) -> None:
    """The real daemon freezes its boot heap (settle_heap) so full collections do not
    stall a crowd of status clients; it is still a working daemon afterwards."""
    with running(tmp_path, conf(prog("idle", "/bin/sleep 1000"))) as d:
        d.wait_until(lambda: d.status()["state"] == "READY", what="READY")
        # READY is published before the boot task settles the heap: wait, then bound it
        frozen = d.wait_until(lambda: d.status()["daemon"]["heap"]["frozen_objects"],
                              what="the heap frozen after boot")
        assert frozen > 10_000, frozen
        for _ in range(300):
            assert d.status()["state"] == "READY"
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
