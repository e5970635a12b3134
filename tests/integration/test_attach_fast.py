"""``codetainer attach``'s fast path: the sh front (``daemon/scripts/codetainer``) reading
the attach file the session keeps (``session/attachfile.py``), driven through a
pseudo-terminal as root, with real tmux running as uid 1000.

The front is what the venv installs as ``codetainer``; the fast path is shown to need no
daemon (the control socket is not even listening) and to give the same client the
Python CLI's attach gives: the agent's uid, no_new_privs, no capabilities, the seccomp
filter, the agent's OOM score, only the terminal's variables, on a relay pty. Whatever
it cannot trust or do goes to the Python CLI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from codetainer.boot import chain
from codetainer.boot.seccomp import filter_hex
from codetainer.session import attachfile

from tests.integration.test_attach import (
    UID,
    PtyProc,
    World,
    shell_works,
    until,
    world,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.integration

FRONT = Path(sys.executable).with_name("codetainer")
CANARY = "CT_ROOT_ONLY_CANARY"


@pytest.fixture
async def fast(world: World) -> AsyncIterator[World]:  # noqa: F811
    """The world, its session keeping the attach file as the daemon's does."""
    if FRONT.read_text().splitlines()[0] != "#!/bin/sh":
        pytest.fail(f"{FRONT} is not the sh front: run ./dev setup")
    world.sm.attach_file = attachfile.path_for(world.ctl)
    world.env[CANARY] = "root's secret"
    yield world


def front(w: World, *args: str, term: str | None = None) -> PtyProc:
    env = dict(w.env)
    if term:
        env["TERM"] = term
    p = PtyProc([str(FRONT), *(args or ("--socket", w.ctl, "attach"))], env)
    w.procs.append(p)
    return p


def client_of(w: World, p: PtyProc) -> psutil.Process:
    r = w.tmux("list-clients", "-F", "#{client_pid}")
    for pid in r.stdout.split():
        proc = psutil.Process(int(pid))
        if p.proc.pid in {a.pid for a in proc.parents()}:
            return proc
    raise AssertionError(f"no client under {p.proc.pid}: {r.stdout!r}")


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


async def test_the_session_keeps_the_attach_file(fast: World) -> None:
    path = Path(attachfile.path_for(fast.ctl))
    await fast.sm.start()
    st = path.lstat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
    # what the front sources: the agent's home and the chain, as attach's CLI renders it
    r = subprocess.run(["sh", "-c", '. "$1"; printf "%s\\n%s\\n%s" "$ct_attach" "$ct_home" '
                        '"$ct_command"', "sh", str(path)], capture_output=True, text=True,
                       check=True)
    flag, home, command = r.stdout.split("\n", 2)
    lim = fast.sm.limits()
    tmux = chain.tmux_attach_argv(shutil.which("tmux") or "", fast.socket,
                                  fast.sm.session_id or "", fast.sm.agent_pane)
    assert (flag, home) == ("1", str(fast.base / "home"))
    assert command == chain.agent_script(
        UID, UID, tmux, filter_hex=filter_hex(), oom_score_adj=lim.oom_score_adj,
        nice=lim.nice, nproc=lim.nproc, cgroup_procs=lim.cgroup_procs)
    await fast.sm.stop()
    assert not path.exists(), "the file outlived the session"


@pytest.mark.parametrize("form", ["--socket PATH attach", "--socket=PATH attach",
                                  "CODETAINER_SOCKET"])
async def test_fast_path_attaches_with_no_daemon_listening(fast: World, form: str) -> None:
    """The control server is never started: an attach that asked the daemon would fail.
    Each way of naming the socket that the CLI takes."""
    await fast.sm.start()
    if form == "CODETAINER_SOCKET":
        fast.env["CODETAINER_SOCKET"] = fast.ctl
        p = front(fast, "attach")
    else:
        p = front(fast, *(["--socket", fast.ctl, "attach"] if form.startswith("--socket ")
                          else [f"--socket={fast.ctl}", "attach"]))
    await until(lambda: p.tty in fast.clients(), what="the client attached")  # as uid 1000
    client = client_of(fast, p)
    links = []  # the processes between the operator's terminal and the client
    for a in client.parents():
        if a.pid == p.proc.pid:
            break
        links.append(a.name())
    assert links and not any("python" in n for n in links), links  # no interpreter ran
    st = status_of(client.pid)
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    assert {st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == \
        {"0000000000000000"}
    assert Path(f"/proc/{client.pid}/oom_score_adj").read_text().strip() == "1000"
    env = dict(v.split("=", 1) for v in
               Path(f"/proc/{client.pid}/environ").read_text().split("\0") if v)
    assert set(env) <= {"TERM", "COLORTERM", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PATH",
                        "SHELL", "HOME", "PWD"}, env  # PWD: the relay's shell sets it
    assert env["HOME"] == str(fast.base / "home") and env["TERM"] == "xterm-256color"
    active = fast.tmux("display-message", "-p", "#{pane_id}").stdout.strip()
    assert active == fast.sm.agent_pane


async def test_fast_path_detach_returns_to_roots_shell(fast: World) -> None:
    await fast.sm.start()
    p = front(fast)
    await until(lambda: p.tty in fast.clients(), what="operator attached")
    p.write(b"\x02d")  # C-b d
    await p.expect(r"detached; `codetainer attach` goes back")
    await until(lambda: not fast.clients(), what="the client gone")
    p.write(f"echo UID=$(id -u) NOATTACH=$CODETAINER_NO_ATTACH C=${CANARY}\n".encode())
    await p.expect(r"UID=0 NOATTACH=1 C=root's secret")  # root's own environment again


async def test_a_stale_file_goes_to_the_cli(fast: World) -> None:
    """The file of a session whose server is gone (a daemon killed outright): tmux cannot
    attach, and the CLI says what it finds (here: no daemon)."""
    await fast.sm.start()
    path = Path(attachfile.path_for(fast.ctl))
    stale = path.read_bytes()
    await fast.sm.stop()
    path.write_bytes(stale)
    path.chmod(0o600)
    fast.env["CODETAINER_ATTACH_WAIT"] = "1"
    p = front(fast)
    await p.expect(r"cannot reach codetainerd at .*control\.sock")
    await shell_works(p)


@pytest.mark.parametrize("how", ["agent-owned", "symlink", "agent-owned directory"])
async def test_a_file_root_does_not_own_is_not_read(fast: World, how: str) -> None:
    """Planted by the agent: the front never sources it; the CLI answers instead."""
    await fast.sm.start()
    path = Path(attachfile.path_for(fast.ctl))
    marker = fast.base / "ran"
    planted = f"ct_attach=1; ct_home=/; ct_command={shlex.quote(f'touch {marker}')}\n"
    if how == "agent-owned":
        path.write_text(planted)
        os.chown(path, UID, UID)
    elif how == "symlink":
        target = fast.base / "elsewhere"
        target.write_text(planted)
        path.unlink()
        path.symlink_to(target)
    else:
        os.chown(fast.base, UID, UID)
    fast.env["CODETAINER_ATTACH_WAIT"] = "1"
    p = front(fast)
    await p.expect(r"cannot reach codetainerd")  # the CLI ran: nothing was attached
    assert not marker.exists()
    if how == "agent-owned directory":
        os.chown(fast.base, 0, 0)


async def test_an_unknown_terminal_goes_to_the_cli_which_attaches(fast: World) -> None:
    await fast.server.start()
    await fast.sm.start()
    p = front(fast, term="xterm-nonesuch")
    await p.expect(r"terminal type 'xterm-nonesuch' is unknown here")
    await until(lambda: p.tty in fast.clients(), what="the CLI's attach")


async def test_other_commands_are_the_clis(fast: World) -> None:
    """Everything but attach is the Python CLI, exit codes included; a variable named like
    the front's own never turns a command into an attach."""
    env = {**fast.env, "sock": fast.ctl, "ct_attach": "1"}
    await fast.sm.start()
    for argv, code in (([str(FRONT), "--socket", fast.ctl, "status"], 4),
                       ([str(FRONT), "--socket", fast.ctl, "bogus"], 64)):
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)
        cli = subprocess.run([str(FRONT.with_name("codetainer-cli")), *argv[1:]],
                             capture_output=True, text=True, env=env, timeout=30, check=False)
        assert (r.returncode, r.stdout, r.stderr) == (code, cli.stdout, cli.stderr), r
    assert fast.clients() == []
