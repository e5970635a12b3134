"""Services with real processes: timing, reload, users, stock supervisord, privileges."""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from codetainer.sandbox.daemonproc import running, wait_for
from codetainer.services.config import load_services

from tests.integration.test_pid1 import LOOPER, conf, prog

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


STOCK_DNS_COMMAND = "/bin/sh -c 'echo stock-dns-up; exec sleep 1000'"
SUPERVISORCTL_SECTIONS = """
[unix_http_server]
file=/run/stock-supervisor.sock
username=ct
password=ct

[supervisorctl]
serverurl=unix:///run/stock-supervisor.sock
username=ct
password=ct

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
"""


def _stock_supervisord(conf_file: Path) -> subprocess.Popen[bytes]:
    """Stock supervisord on ``conf_file``, in private mount and pid namespaces whose /run and
    /tmp are fresh tmpfs (the file's pidfile and sockets never touch the host). The file is
    copied into the new /run first, since the new /tmp hides pytest's tmp_path."""
    supervisord = Path(sys.executable).parent / "supervisord"
    script = (f"mount -t tmpfs none /run && cp {conf_file} /run/stock.conf && "
              f"mount -t tmpfs none /tmp && exec {supervisord} -n -c /run/stock.conf")
    return subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c",
                             script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _dns_runnable_copy(tmp_path: Path) -> Path:
    """The repository's file with, in [program:dns], ONLY ``command=`` (the generated exec
    script does not exist here) and ``autostart=`` (forced true) changed, plus the sections
    supervisorctl needs to ask supervisord about it."""
    out, section, changed = [], "", []
    for line in (ROOT / "supervisord" / "codetainer.conf").read_text().splitlines():
        if line.startswith("["):
            section = line.strip()
        key = line.split("=", 1)[0].strip()
        if section == "[program:dns]" and key in ("command", "autostart"):
            line = f"command={STOCK_DNS_COMMAND}" if key == "command" else "autostart=true"
            changed.append(key)
        out.append(line)
    assert sorted(changed) == ["autostart", "command"]
    copy = tmp_path / "codetainer.conf"
    copy.write_text("\n".join(out) + "\n" + SUPERVISORCTL_SECTIONS)
    return copy


def test_repo_services_file_parses_and_starts_under_stock_supervisord(tmp_path: Path) -> None:
    services = load_services(ROOT / "supervisord" / "codetainer.conf")
    assert [s.name for s in services] == ["dns", "proxy"]
    dns = services[0]
    assert (dns.autostart, dns.autorestart, dns.stopasgroup) == (False, "true", True)
    # Stock supervisord accepts the unmodified file (dns has autostart=false: nothing runs).
    proc = _stock_supervisord(ROOT / "supervisord" / "codetainer.conf")
    try:
        time.sleep(2.0)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    finally:
        proc.kill()  # unshare ignores SIGTERM; --kill-child takes supervisord with it
        out = proc.communicate(timeout=10)[0].decode()
    assert "Error" not in out and "CRIT" not in out, out

    # Stock supervisord really runs [program:dns] as the file defines it: a copy where only
    # command= and autostart= change reaches RUNNING (after startsecs=1).
    copy = _dns_runnable_copy(tmp_path)
    stock_dns, _proxy = load_services(copy)  # [program:proxy] stays autostart=false
    assert stock_dns == dataclasses.replace(dns, command=tuple(shlex.split(STOCK_DNS_COMMAND)),
                                            autostart=True)
    proc = _stock_supervisord(copy)
    try:
        def supervisord_pid() -> int | None:
            for child in psutil.Process(proc.pid).children():
                if child.name() == "supervisord" or "supervisord" in " ".join(child.cmdline()):
                    return child.pid
            return None

        pid = _until(supervisord_pid, 10, "stock supervisord")

        def ctl_status_running() -> str | None:
            r = subprocess.run(["nsenter", f"--target={pid}", "--mount",
                                str(Path(sys.executable).parent / "supervisorctl"),
                                "-c", "/run/stock.conf", "status", "dns"],
                               capture_output=True, text=True, timeout=10)
            return r.stdout if "RUNNING" in r.stdout else None

        line = _until(ctl_status_running, 15, "dns RUNNING")
        assert line.split()[:2] == ["dns", "RUNNING"], line
        dns_pid = int(line.split("pid ")[1].split(",")[0])  # in supervisord's pid namespace
        [child] = psutil.Process(pid).children()
        assert child.cmdline() == ["sleep", "1000"]
        nspid = next(ln for ln in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                     if ln.startswith("NSpid:"))
        assert int(nspid.split()[-1]) == dns_pid  # the process supervisorctl reports
        os.kill(pid, signal.SIGTERM)  # supervisord stops dns (stopsignal=TERM), then exits
        assert proc.wait(15) == 0
        assert not psutil.pid_exists(child.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=10)[0].decode()
    assert "stock-dns-up" in out, out  # stdout_logfile=/dev/stdout: the program's output
    assert "success: dns entered RUNNING state" in out, out
    assert "Error" not in out and "CRIT" not in out, out


def _until(pred: Any, timeout: float, what: str) -> Any:
    return wait_for(pred, timeout, what, interval=0.1)


def test_running_only_after_startsecs_real(tmp_path: Path) -> None:
    with running(tmp_path, conf(prog("slow", f"/bin/sh -c '{LOOPER}'", startsecs=1))) as d:
        t0 = time.monotonic()
        d.wait_until(lambda: d.service("slow")["state"] == "STARTING", what="STARTING")
        d.wait_until(lambda: d.service("slow")["state"] == "RUNNING", what="RUNNING")
        assert 0.8 <= time.monotonic() - t0 <= 2.0


def test_backoff_then_fatal_real(tmp_path: Path) -> None:
    with running(tmp_path, conf(prog("crash", "/bin/sh -c 'exit 1'", startsecs=1,
                                     startretries=2))) as d:
        t0 = time.monotonic()
        d.wait_until(lambda: d.service("crash")["state"] == "FATAL", timeout=15, what="FATAL")
        # backoff delays 1 s + 2 s between the three attempts
        assert 2.5 <= time.monotonic() - t0 <= 5.0
        gave_up = [e for e in d.events() if e.get("event") == "service_gave_up"]
        assert gave_up and gave_up[0]["attempts"] == 3
        assert d.service("crash")["restarts"] == 2


def test_stop_during_backoff_real(tmp_path: Path) -> None:
    with running(tmp_path, conf(prog("crash", "/bin/sh -c 'exit 1'", startsecs=1,
                                     startretries=10))) as d:
        d.wait_until(lambda: d.service("crash")["state"] == "BACKOFF", what="BACKOFF")
        assert d.call("stop", name="crash")["state"] == "STOPPED"
        time.sleep(1.5)
        assert d.service("crash")["state"] == "STOPPED"


def _user_with_supplementary_groups() -> pwd.struct_passwd:
    """A non-root user of this host with a supplementary group if there is one (the real
    drop is then visible), else nobody: its groups ([65534]) still differ from root's."""
    for pw in sorted(pwd.getpwall(), key=lambda p: p.pw_uid):
        if pw.pw_uid != 0 and len(set(os.getgrouplist(pw.pw_name, pw.pw_gid))) > 1:
            return pw
    return pwd.getpwnam("nobody")


def test_user_environment_directory(open_tmp: Path) -> None:
    tmp_path = open_tmp
    out = tmp_path / "who"
    user = _user_with_supplementary_groups()
    expected_groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    assert os.getgroups() != sorted(expected_groups)  # the daemon (root) has other groups
    cmd = (f"/bin/sh -c 'grep -E \"^(Uid|Gid|Groups):\" /proc/self/status > {out}.tmp; "
           f"echo $FOO $(pwd) >> {out}.tmp; mv {out}.tmp {out}; exec sleep 1000'")
    p = prog("who", cmd, user=user.pw_name, environment='FOO="bar baz"', directory="/tmp")
    with running(tmp_path, conf(p)) as d:
        d.wait_until(lambda: out.exists(), what="output")
        lines = out.read_text().splitlines()
        fields = {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in lines if ":" in ln}
        # real, effective, saved and filesystem ids are all the user's
        assert fields["Uid"] == [str(user.pw_uid)] * 4, (user.pw_name, lines)
        assert fields["Gid"] == [str(user.pw_gid)] * 4, (user.pw_name, lines)
        groups = {int(g) for g in fields["Groups"]}
        assert groups == expected_groups, (user.pw_name, grp.getgrgid(user.pw_gid).gr_name, lines)
        assert lines[-1].split() == ["bar", "baz", "/tmp"]


def test_output_becomes_log_events_and_tail(tmp_path: Path) -> None:
    cmd = "/bin/sh -c 'for i in $(seq 80); do echo line$i; done; echo oops >&2; exec sleep 1000'"
    with running(tmp_path, conf(prog("talk", cmd))) as d:
        d.wait_until(lambda: "oops" in d.service("talk")["tail"], what="tail")
        tail = d.service("talk")["tail"]
        assert len(tail) == 50
        evs = [e for e in d.events() if e.get("event") == "service_output"]
        assert {"service": "talk", "stream": "stderr", "line": "oops"}.items() <= \
            next(e for e in evs if e["line"] == "oops").items()


def test_output_flood_is_rate_limited_counted_and_tailed(tmp_path: Path) -> None:
    """README: output is rate-limited (100 lines/s, bursts of 200), the last 50 lines are kept."""
    cli = str(Path(sys.executable).parent / "codetainer")
    lines = [f"line{i}" for i in range(1, 5001)]
    cmd = "/bin/sh -c 'seq -f line%%g 5000; exec sleep 1000'"  # %% : supervisor's format escape
    with running(tmp_path, conf(prog("flood", cmd))) as d:
        def dropped_reports() -> list[dict[str, object]]:
            return [e for e in d.events() if e.get("event") == "service_output_dropped"
                    and e.get("service") == "flood"]

        d.wait_until(lambda: d.service("flood")["tail"][-1:] == ["line5000"], what="tail")
        d.wait_until(dropped_reports, timeout=5, what="service_output_dropped")
        time.sleep(1.5)  # a second report, if one were (wrongly) due, would come by now
        logged = [e["line"] for e in d.events() if e.get("event") == "service_output"
                  and e.get("service") == "flood"]
        # The burst passes in order; the bucket refills at 100/s while the daemon reads the
        # 5000 lines, which takes far less than a second.
        assert logged[:200] == lines[:200]
        assert 200 <= len(logged) <= 300, len(logged)
        reports = dropped_reports()
        assert len(reports) == 1, reports
        assert reports[0]["dropped"] == reports[0]["total"] == 5000 - len(logged)
        assert (reports[0]["rate"], reports[0]["burst"]) == (100.0, 200.0)
        assert reports[0]["level"] == "warning"
        assert d.service("flood")["tail"] == lines[-50:]  # the tail is never rate-limited
        r = subprocess.run([cli, "--socket", d.socket, "status", "--tail"], capture_output=True,
                           text=True, timeout=10)
        shown = [ln.removeprefix("      | ") for ln in r.stdout.splitlines()
                 if ln.startswith("      | ")]
        assert shown == lines[-50:], r.stdout


def test_priority_start_order(tmp_path: Path) -> None:
    """Services are spawned in ascending priority: the order the daemon records its
    spawns in (the order in which the started shells get to run is the scheduler's)."""
    progs = [prog(n, "/bin/sleep 1000", priority=p) for n, p in (("c", 30), ("a", 10), ("b", 20))]
    with running(tmp_path, conf(*progs)) as d:
        def spawned() -> list[str]:
            return [e["service"] for e in d.events() if e.get("event") == "service_spawned"]

        d.wait_until(lambda: len(spawned()) == 3, what="3 spawns")
        assert spawned() == ["a", "b", "c"]


def test_sighup_reload_restarts_only_changed(tmp_path: Path) -> None:
    keep = prog("keep", "/bin/sleep 1001")
    change = prog("change", "/bin/sleep 1002")
    drop = prog("drop", "/bin/sleep 1003")
    with running(tmp_path, conf(keep, change, drop)) as d:
        d.wait_until(lambda: all(s["state"] == "RUNNING" for s in d.status()["services"]),
                     what="RUNNING")
        before = {s["name"]: s["pid"] for s in d.status()["services"]}
        d.conf.write_text(conf(keep, prog("change", "/bin/sleep 2002"),
                               prog("new", "/bin/sleep 1004")))
        d.signal(signal.SIGHUP)
        d.wait_until(lambda: {s["name"] for s in d.status()["services"]} == {"keep", "change",
                                                                             "new"},
                     what="reloaded set")
        d.wait_until(lambda: all(s["state"] == "RUNNING" for s in d.status()["services"]),
                     what="RUNNING after reload")
        after = {s["name"]: s["pid"] for s in d.status()["services"]}
        assert after["keep"] == before["keep"]
        assert after["change"] != before["change"]
        reloaded = [e for e in d.events() if e.get("event") == "services_reloaded"]
        assert reloaded[-1]["changed"] == ["change"]
        assert reloaded[-1]["removed"] == ["drop"]
        assert reloaded[-1]["added"] == ["new"]


def test_reload_with_broken_file_changes_nothing(tmp_path: Path) -> None:
    with running(tmp_path, conf(prog("keep", "/bin/sleep 1001"))) as d:
        d.wait_until(lambda: d.service("keep")["state"] == "RUNNING", what="RUNNING")
        pid = d.service("keep")["pid"]
        d.conf.write_text("[supervisord]\n[program:keep]\nstartsecs=nope\ncommand=/bin/true\n")
        r = subprocess.run([str(Path(sys.executable).parent / "codetainer"), "--socket", d.socket,
                            "reload"], capture_output=True, text=True, timeout=10)
        assert r.returncode == 1
        assert "reload failed, nothing changed" in r.stderr
        assert d.service("keep")["pid"] == pid


def as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=20)


def test_privileged_ops_refused_for_other_uid_and_accepted_for_root(open_tmp: Path) -> None:
    tmp_path = open_tmp
    cli = str(Path(sys.executable).parent / "codetainer")
    with running(tmp_path, conf(prog("svc", "/bin/sleep 1000"))) as d:
        d.wait_until(lambda: d.service("svc")["state"] == "RUNNING", what="RUNNING")
        pid = d.service("svc")["pid"]
        # Read-only operations are open to anyone local.
        r = as_nobody([cli, "--socket", d.socket, "status", "--json"])
        assert r.returncode in (0, 1), r.stderr
        assert json.loads(r.stdout)["services"][0]["name"] == "svc"
        for op in (["restart", "svc"], ["stop", "svc"], ["reload"], ["shutdown"]):
            r = as_nobody([cli, "--socket", d.socket, *op])
            assert r.returncode == 1
            assert f"permission denied: '{op[0]}' requires root (your uid is {NOBODY})" in r.stderr
        assert d.service("svc")["pid"] == pid
        denied = [e for e in d.events() if e.get("event") == "control_denied"]
        assert len(denied) == 4 and all(e["uid"] == NOBODY for e in denied)
        r = subprocess.run([cli, "--socket", d.socket, "restart", "svc"], capture_output=True,
                           text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert d.service("svc")["pid"] != pid
        r = subprocess.run([cli, "--socket", d.socket, "shutdown"], capture_output=True,
                           text=True, timeout=20)
        assert r.returncode == 0
        assert d.wait() == 0


def test_status_exit_codes_and_unreachable(tmp_path: Path) -> None:
    cli = str(Path(sys.executable).parent / "codetainer")
    r = subprocess.run([cli, "--socket", str(tmp_path / "none.sock"), "status"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 4
    assert str(tmp_path / "none.sock") in r.stderr and "Is codetainerd running?" in r.stderr
    with running(tmp_path, conf(prog("ok", "/bin/sleep 1000"))) as d:
        r = subprocess.run([cli, "--socket", d.socket, "wait"], capture_output=True, text=True,
                           timeout=20)
        assert r.returncode == 0 and "boot: READY" in r.stdout
        r = subprocess.run([cli, "--socket", d.socket, "status"], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 0
        assert "READY" in r.stdout and "\x1b[" not in r.stdout  # plain when not a TTY
        r = subprocess.run([cli, "--socket", d.socket, "status", "--check"],
                           capture_output=True, text=True, timeout=10)
        assert (r.returncode, r.stdout.strip()) == (0, "HEALTHY: READY")
    with running(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path,
                 conf(prog("bad", "/bin/sh -c 'exit 1'", startretries=0, startsecs=1))) as d:
        d.wait_until(lambda: d.status()["state"] != "BOOTING", timeout=15, what="boot end")
        r = subprocess.run([cli, "--socket", d.socket, "status"], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 1  # DEGRADED: the services step is degraded policy
        assert "not running: bad FATAL" in r.stdout


def _cli(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "codetainer"), "--socket",
                           socket_path, *args], capture_output=True, text=True, timeout=20)


STEP_KEYS = {"name", "state", "duration_s", "reason"}
SERVICE_KEYS = {"name", "state", "pid", "restarts", "last_exit"}


def test_status_exit_code_2_when_a_fatal_step_failed(tmp_path: Path) -> None:
    # secrets is a fatal step; without GH_PAT (DaemonProc passes no environment) it fails.
    with running(tmp_path, conf(prog("idle", "/bin/sleep 1000")), steps="secrets") as d:
        d.wait_until(lambda: d.status()["state"] != "BOOTING", what="boot end")
        r = _cli(d.socket, "status")
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "FAILED" in r.stdout and "GH_PAT" in r.stdout
        r = _cli(d.socket, "status", "--json")
        assert r.returncode == 2
        st = json.loads(r.stdout)
        assert st["state"] == "FAILED"
        [step] = st["steps"]
        assert set(step) >= STEP_KEYS, step
        assert (step["name"], step["state"]) == ("secrets", "FAILED")
        assert "GH_PAT" in step["reason"] and isinstance(step["duration_s"], float)
        assert [s["name"] for s in st["services"]] == ["idle"]
        assert set(st["services"][0]) >= SERVICE_KEYS
        # FAILED is unhealthy, and `wait` reports the same outcome with the same code
        r = _cli(d.socket, "status", "--check")
        assert r.returncode == 1 and r.stdout.startswith("UNHEALTHY: FAILED")
        r = _cli(d.socket, "wait")
        assert r.returncode == 2 and "boot: FAILED" in r.stdout


def test_status_exit_code_3_while_booting_and_while_stopping(tmp_path: Path) -> None:
    # The services step waits for `slow` to be RUNNING: boot stays BOOTING for startsecs.
    slow = prog("slow", "/bin/sleep 1000", startsecs=4)
    stubborn = prog("stubborn", f"/bin/sh -c 'trap \"\" TERM; {LOOPER}'", stopwaitsecs=4)
    with running(tmp_path, conf(slow, stubborn)) as d:
        r = _cli(d.socket, "status", "--json")
        assert r.returncode == 3, (r.stdout, r.stderr)
        st = json.loads(r.stdout)
        assert st["state"] == "BOOTING"
        [step] = st["steps"]
        assert set(step) >= STEP_KEYS, step
        assert (step["name"], step["state"], step["duration_s"]) == ("services", "RUNNING", None)
        svcs = {s["name"]: s for s in st["services"]}
        assert set(svcs) == {"slow", "stubborn"}
        for s in svcs.values():
            assert set(s) >= SERVICE_KEYS, s
        assert svcs["slow"]["state"] == "STARTING" and isinstance(svcs["slow"]["pid"], int)
        assert (svcs["slow"]["restarts"], svcs["slow"]["last_exit"]) == (0, None)
        r = _cli(d.socket, "status")
        assert r.returncode == 3 and "BOOTING" in r.stdout
        r = _cli(d.socket, "status", "--check")
        assert r.returncode == 1 and r.stdout.strip() == "UNHEALTHY: BOOTING"

        d.wait_until(lambda: d.status()["state"] == "READY", what="READY")
        assert _cli(d.socket, "status").returncode == 0
        # Shutdown waits up to stopwaitsecs for `stubborn`: STOPPING meanwhile.
        d.signal(signal.SIGTERM)
        d.wait_until(lambda: d.status()["state"] == "STOPPING", what="STOPPING")
        r = _cli(d.socket, "status")
        assert r.returncode == 3 and "STOPPING" in r.stdout, (r.stdout, r.stderr)
        assert d.wait() == 0


def test_services_never_inherit_a_secret(tmp_path: Path) -> None:
    """supervisord semantics: a child inherits the supervisor's environment, but not the
    secrets in it (even with no secrets step to take them out first); `environment=`
    still sets what a program declares."""
    out = tmp_path / "env"
    cmd = f"/bin/sh -c 'env > {out}.tmp; mv {out}.tmp {out}; exec sleep 1000'"
    env = {"GH_PAT": "ghp_servicesMustNotSeeThis", "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-nope",
           "GH_TOKEN": "ghp_norThis", "REPO_URL": "https://u:pw@example.com/r", "KEEP_ME": "yes"}
    with running(tmp_path, conf(prog("envdump", cmd, environment="DECLARED=1")), env=env) as d:
        d.wait_until(lambda: out.exists(), what="the service's environment")
        seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
        assert seen["KEEP_ME"] == "yes" and seen["DECLARED"] == "1"  # inheritance works
        for name in ("GH_PAT", "CLAUDE_CODE_OAUTH_TOKEN", "GH_TOKEN", "REPO_URL"):
            assert name not in seen, name
        assert "ghp_" not in out.read_text() and "pw@" not in out.read_text()


# -- waiting for a state: signalled by the FSM's change, never polled -------------------

def _service(name: str, command: str, **kw: Any) -> Any:
    from codetainer.events import EventBus
    from codetainer.services.config import ServiceConfig
    from codetainer.services.process import Service

    svc = Service(ServiceConfig(name, tuple(shlex.split(command)), **kw), EventBus())
    svc.run()
    return svc


async def test_wait_state_is_woken_by_the_change_and_keeps_its_deadline() -> None:
    from codetainer.services.states import ProcessState as S

    svc = _service("slow", "/bin/sleep 1000", startsecs=1.0)
    try:
        t0 = time.monotonic()
        assert await svc.wait_state({S.FATAL}, 0.3) is False, "never FATAL"
        assert 0.3 <= time.monotonic() - t0 < 0.6, "the deadline is kept"
        changed: dict[S, float] = {}
        hook = svc.fsm.on_change

        def spy(old: S, new: S) -> None:
            changed[new] = time.monotonic()
            hook(old, new)

        svc.fsm.on_change = spy
        running = asyncio.create_task(svc.wait_state({S.RUNNING}, 5.0))
        svc.start()
        assert await running is True
        woke = time.monotonic()
        assert 0.8 <= woke - changed[S.STARTING] <= 2.0  # startsecs
        assert woke - changed[S.RUNNING] < 0.01, "woken by the change, not a later poll"
        assert svc._waiters == [], "a waiter is forgotten once it returned"
        await svc.stop_and_wait(2.0)
        assert svc.state is S.STOPPED
    finally:
        await svc.close()


async def test_wait_state_sees_a_state_passed_through_in_one_step() -> None:
    """A spawn error goes STARTING -> BACKOFF in one step: a poll can never see STARTING,
    a waiter woken on each change does."""
    from codetainer.services.states import ProcessState as S

    svc = _service("broken", "/nonexistent/program", startsecs=1.0, startretries=0)
    try:
        starting = asyncio.create_task(svc.wait_state({S.STARTING}, 5.0))
        await asyncio.sleep(0)  # the waiter is registered (one loop turn, not a delay)
        svc.start()
        assert svc.state is S.BACKOFF
        assert await starting is True
        assert await svc.wait_state({S.FATAL}, 5.0) is True
        assert "cannot start /nonexistent/program" in svc.fsm.spawnerr
    finally:
        await svc.close()
