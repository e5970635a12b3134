"""Services with real processes: timing, reload, users, stock supervisord, privileges."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from codetainer.services.config import load_services

from tests.daemonproc import running
from tests.integration.test_pid1 import LOOPER, conf, prog

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def test_repo_services_file_parses_and_starts_under_stock_supervisord(tmp_path: Path) -> None:
    services = load_services(ROOT / "supervisord" / "codetainer.conf")
    assert [s.name for s in services] == ["dns"]
    dns = services[0]
    assert (dns.autostart, dns.autorestart, dns.stopasgroup) == (False, "true", True)
    # Stock supervisord, in a private mount namespace with its own /run, on the same file.
    supervisord = Path(sys.executable).parent / "supervisord"
    script = (f"mount -t tmpfs none /run && mount -t tmpfs none /tmp && "
              f"exec {supervisord} -n -c {ROOT / 'supervisord' / 'codetainer.conf'}")
    proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c",
                             script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(2.0)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    finally:
        proc.kill()  # unshare ignores SIGTERM; --kill-child takes supervisord with it
        out = proc.communicate(timeout=10)[0].decode()
    assert "Error" not in out and "CRIT" not in out, out


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


def test_user_environment_directory(open_tmp: Path) -> None:
    tmp_path = open_tmp
    out = tmp_path / "who"
    cmd = f"/bin/sh -c 'echo $(id -u) $(id -g) $(id -G) $FOO $(pwd) > {out}; exec sleep 1000'"
    p = prog("who", cmd, user="nobody", environment='FOO="bar baz"', directory="/tmp")
    with running(tmp_path, conf(p)) as d:
        d.wait_until(lambda: out.exists() and out.read_text(), what="output")
        uid, _gid, *rest = out.read_text().split()
        assert int(uid) == NOBODY
        assert rest[-3:] == ["bar", "baz", "/tmp"]


def test_output_becomes_log_events_and_tail(tmp_path: Path) -> None:
    cmd = "/bin/sh -c 'for i in $(seq 80); do echo line$i; done; echo oops >&2; exec sleep 1000'"
    with running(tmp_path, conf(prog("talk", cmd))) as d:
        d.wait_until(lambda: "oops" in d.service("talk")["tail"], what="tail")
        tail = d.service("talk")["tail"]
        assert len(tail) == 50
        evs = [e for e in d.events() if e.get("event") == "service_output"]
        assert {"service": "talk", "stream": "stderr", "line": "oops"}.items() <= \
            next(e for e in evs if e["line"] == "oops").items()


def test_priority_start_order(tmp_path: Path) -> None:
    order = tmp_path / "order"
    progs = [prog(n, f"/bin/sh -c 'echo {n} >> {order}; exec sleep 1000'", priority=p)
             for n, p in (("c", 30), ("a", 10), ("b", 20))]
    with running(tmp_path, conf(*progs)) as d:
        d.wait_until(lambda: order.exists() and len(order.read_text().split()) == 3, what="3")
        assert order.read_text().split() == ["a", "b", "c"]


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
