"""The exec chain for real: what a process started through it is, and cannot undo.

The daemon's chain (``privileges.setpriv_argv``) and the one ``codetainer attach``
renders from the daemon's ``session`` reply (``attach.dropped_attach``, without
libseccomp) are run as root, as their callers run them, with a probe in place of tmux.
Every property README's boundary section names is read back from the kernel: uid and
gid, no groups, no_new_privs, no capability in any set, the seccomp filter, the OOM
score (a floor where root holds CAP_SYS_RESOURCE) and the nice value (which cannot be
lowered), the process and core limits
(hard: they cannot be raised), and the pid written into the agent's ``cgroup.procs``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from codetainer.boot import chain, seccomp
from codetainer.boot.privileges import AgentUser, ExecLimits, setpriv_argv
from codetainer.cli import attach
from codetainer.limits.controller import has_cap_sys_resource
from codetainer.sandbox.world import PYTHON

pytestmark = pytest.mark.integration

#: no user has it: what these tests start as it is all it runs
SPARE_UID = 64127

PROBE = r"""
import ctypes, errno, json, os, resource
status = dict(ln.rstrip("\n").split(":\t", 1) for ln in open("/proc/self/status"))
out = {k: status[k] for k in ("NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd",
                              "CapAmb")}
out["pid"] = os.getpid()
out["uid"], out["gid"], out["groups"] = os.getresuid(), os.getresgid(), os.getgroups()
out["oom_score_adj"] = open("/proc/self/oom_score_adj").read().strip()
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("0")
    out["oom_lowered"] = True
except OSError:
    out["oom_lowered"] = False
out["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
try:
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    out["nice_lowered"] = True
except OSError:
    out["nice_lowered"] = False
out["nproc"] = resource.getrlimit(resource.RLIMIT_NPROC)
out["core"] = resource.getrlimit(resource.RLIMIT_CORE)
try:
    resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20))
    out["core_raised"] = True
except (OSError, ValueError):
    out["core_raised"] = False
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.unshare(0x10000000)  # CLONE_NEWUSER
out["unshare"] = "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps(out))
"""


def check(r: subprocess.CompletedProcess[str], procs: Path, nproc: int) -> None:
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["uid"] == [SPARE_UID] * 3 and got["gid"] == [SPARE_UID] * 3, got
    assert got["groups"] == [], got
    assert got["NoNewPrivs"] == "1" and got["Seccomp"] == "2", got
    assert {got[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == \
        {"0000000000000000"}, got
    assert got["oom_score_adj"] == "1000", got
    # root's write is a floor only when root holds CAP_SYS_RESOURCE (limits/controller.py;
    # Docker's default set lacks it, and so does this sandbox's root): the kernel's rule,
    # the same for the daemon's chain and attach's
    assert got["oom_lowered"] is not has_cap_sys_resource(), got
    assert got["nice"] == 10 and got["nice_lowered"] is False, got
    assert got["nproc"] == [nproc, nproc] and got["core"] == [0, 0], got
    assert got["core_raised"] is False, got
    assert got["unshare"] == "EPERM", got  # the filter
    # the JOIN prologue wrote the pid that every later link exec'd in: the probe's own
    assert procs.read_text().split() == [str(got["pid"])]


@pytest.fixture()
def procs(tmp_path: Path) -> Path:
    """A stand-in for the agent's ``cgroup.procs`` (the real cgroup: test_limits.py)."""
    path = tmp_path / "agent" / "cgroup.procs"
    path.parent.mkdir()
    path.touch()
    return path


@pytest.fixture(params=["c", "python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each loader: the C one (built by ./dev setup, the image's) and the Python one it
    stands for where it is not built; the chain renders whichever is there."""
    if request.param == "c":
        assert chain.native_loader() is not None, "codetainer-seccomp not built: ./dev setup"
    else:
        monkeypatch.setattr(chain, "native_loader", lambda: None)
    return str(request.param)


def test_the_daemons_chain(procs: Path, loader: str) -> None:
    user = AgentUser("spare", SPARE_UID, SPARE_UID, "/")
    argv = setpriv_argv(user, [PYTHON, "-I", "-c", PROBE], ExecLimits(1000, 10, 321, (str(procs),)))
    assert ("codetainer-seccomp" in argv[argv.index("--", 8) + 1]) is (loader == "c")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    check(r, procs, 321)


def test_the_chain_attach_renders_from_the_session_reply(procs: Path) -> None:
    """What root's tmux client runs in, the filter taken from the reply (the client never
    imports libseccomp), run by a shell as ``script``'s runs it: the same properties."""
    info = {"socket": "/nonexistent", "id": "$0", "uid": SPARE_UID, "gid": SPARE_UID,
            "home": "/", "seccomp_filter": seccomp.filter_hex(),
            "limits": ExecLimits(1000, 10, 123, (str(procs),)).as_dict()}
    argv, _env = attach.dropped_attach(info, {"PATH": "/usr/bin:/bin"})
    script = argv[argv.index(attach.SCRIPT):][5]
    tmux = shlex.join(attach.tmux_attach_argv(info))
    assert script.count(tmux) == 1
    probe = script.replace(tmux, shlex.join([PYTHON, "-I", "-c", PROBE]))
    r = subprocess.run(["/bin/sh", "-c", probe], capture_output=True, text=True, timeout=60,
                       check=False)
    check(r, procs, 123)


@pytest.mark.parametrize(("option", "why"), [("--nproc=x", "unknown option"),
                                             ("--nice=-5", "unknown option"),
                                             ("--stack=0", "unknown option"),
                                             ("--nproc=", "unknown option"),
                                             ("--core=99999999999999999999999", "cannot set")])
def test_a_limit_the_loader_cannot_read_stops_the_chain(tmp_path: Path, option: str,
                                                        why: str, loader: str) -> None:
    marker = tmp_path / "ran"
    argv = [*chain.loader_argv(seccomp.filter_hex(), [option]), "/bin/sh", "-c", f"echo >{marker}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 126 and why in r.stderr and not marker.exists(), r
    assert r.stderr.startswith("codetainer-seccomp: "), r.stderr


@pytest.mark.parametrize(("filt", "code", "why"), [("zz" * 8, 126, "not hex"),
                                                   ("", 126, "usage"),
                                                   (None, 127, "cannot run")])
def test_a_bad_filter_or_program_stops_the_chain(tmp_path: Path, filt: str | None, code: int,
                                                 why: str, loader: str) -> None:
    marker = tmp_path / "ran"
    hexed = seccomp.filter_hex() if filt is None else filt
    program = ["/nonexistent/prog"] if filt is None else ["/bin/sh", "-c", f"echo >{marker}"]
    argv = [*chain.loader_argv(hexed), *program]
    if not hexed:
        argv.remove("")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == code and why in r.stderr and not marker.exists(), r
