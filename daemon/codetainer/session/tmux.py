"""The agent's tmux session: created, watched and stopped by the daemon.

Shape: one tmux server on a fixed socket, run as the agent user (through
``setpriv_argv``: no_new_privs, empty bounding set), one session with the agent in the
top pane (80%) and a login shell below (20%), the agent pane selected.

Ownership rules:

* The session is tracked by tmux's session id (``$0``), never its name: a Claude Code
  hook renames it. The agent pane is tracked by pane id and marked with the pane option
  ``@codetainer_role=agent`` so a daemon that restarts can adopt a running session.
* ``monitor()`` polls tmux (one client call per tick). The agent pane is supervised on
  the service state machine (``panepolicy.py`` feeds ``services/fsm.py`` the pane's
  events): a dead agent pane (kept visible by ``remain-on-exit``) is respawned with
  exponential backoff under policy ``respawn``, or left for the operator under ``leave``;
  after ``max_rapid_restarts`` consecutive runs shorter than ``stable_after`` the daemon
  gives up (supervisord's FATAL). A closed agent pane is put back at once under
  ``respawn``. A lost server or session is recreated, with backoff and a limit.
* Root is never a client of anything the agent controls. The tmux server belongs to the
  agent, and a tmux server can make its client run a program (``MSG_SHELL``, or
  ``detach-client -E``), so every tmux client the daemon runs, the creation and every
  later query or command, goes through the agent's own privilege drop (``setpriv``:
  agent uid, no_new_privs, empty bounding set, the agent's limits: what a server makes
  its client run is held like any agent process). Whatever the server answers is data:
  a pid it reports is acted on (killed, sampled) only while it belongs to the agent's
  uid (docs/security.md).

Lifecycle (also in tests/unit/test_session_manager.py)::

    STOPPED    -> STARTING | STOPPING
    STARTING   -> RUNNING | FAILED | STOPPING
    RUNNING    -> RECOVERING | STOPPING
    RECOVERING -> RUNNING | FAILED | STOPPING
    FAILED     -> STARTING | STOPPING
    STOPPING   -> STOPPED
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from codetainer import backoff, procinfo
from codetainer.boot.privileges import AgentProxy, AgentUser, ExecLimits, agent_env, setpriv_argv
from codetainer.boot.seccomp import SeccompUnavailable, filter_hex
from codetainer.lifecycle import InvalidTransition, transition
from codetainer.limits.plan import settings_exec_limits
from codetainer.session import attachfile
from codetainer.session import prompt as prompt_mod
from codetainer.session.panepolicy import AgentExit, PanePolicy, pane_config
from codetainer.session.states import TRANSITIONS, SessionState
from codetainer.session.tmuxctl import (
    CLIENT_FMT,
    GONE,
    PANE_FMT,
    ROLE_OPTION,
    Pane,
    SessionError,
    Snapshot,
    TmuxGone,
    agent_process,
    int_or_none,
    parse_snapshot,
    prepare_socket_dir,
    run,
    wait_gone,
)
from codetainer.session.usage import UsageCache

if TYPE_CHECKING:
    from codetainer.control.server import Request
    from codetainer.events import EventBus
    from codetainer.settings import Settings
    from codetainer.status import SessionInfo, SessionStatus

log = structlog.get_logger("codetainer.session")

CONFIG_FILE = Path(__file__).with_name("tmux.conf")
SESSION_NAME = "claude"
TARGET_OWNER = ("user", "uid", "gid", "home", "limits")

__all__ = ["InvalidTransition", "SessionError", "SessionManager", "SessionState", "TmuxGone"]


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        events: EventBus,
        secrets: Mapping[str, str] | None = None,
        user: AgentUser | None = None,
        *,
        cwd: str | None = None,
        environ: Mapping[str, str] | None = None,
        config: str | None = None,
        session_name: str = SESSION_NAME,
        poll_interval: float = 1.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        stable_after: float = 30.0,
        max_rapid_restarts: int = 10,
        recreate_limit: int = 10,
        limits: Callable[[], ExecLimits] | None = None,
        attach_file: str | None = None,
    ) -> None:
        self.settings = settings
        self.events = events
        # A live view, not a copy: the daemon builds the manager before the secrets
        # step has filled its mapping (a copy left the agent without its tokens).
        self.secrets: Mapping[str, str] = {} if secrets is None else secrets
        self.user = user
        # What every process of the agent's uid starts under, the daemon's own tmux
        # clients included (a server of the agent's can make its client run a program):
        # read at each launch, as the limits step settles it after this is built.
        self.limits = limits or (lambda: settings_exec_limits(settings))
        self.environ = os.environ if environ is None else environ
        self.attach_file = attach_file  # kept while RUNNING (session/attachfile.py)
        self.socket = settings.tmux_socket
        self.config = config or str(CONFIG_FILE)
        self.session_name = session_name
        self.policy = settings.agent_restart  # respawn or leave, checked with the settings
        self._cwd = cwd
        self.poll_interval = poll_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.max_rapid_restarts = max_rapid_restarts
        self.recreate_limit = recreate_limit
        self.prompt_file = str(Path(self.socket).parent / prompt_mod.PROMPT_FILE_NAME)
        self._prompt = prompt_mod.find_prompt(self.secrets, self.environ)
        self._prompt_written = False

        self.state = SessionState.STOPPED
        self.reason = ""
        self.hint: str | None = None
        self.session_id: str | None = None
        self.name: str | None = None
        self.agent_pane: str | None = None
        self.shell_pane: str | None = None
        self.server_pid: int | None = None
        self.cwd: str | None = None
        self.restarts = {"agent": 0, "server": 0}
        self.snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._usage = UsageCache()
        self._pane = PanePolicy(pane_config(  # the agent pane's restarts, on the service FSM
            self.policy, stable_after=stable_after, max_rapid_restarts=max_rapid_restarts,
            backoff_base=backoff_base, backoff_max=backoff_max))
        # server recovery bookkeeping
        self._recover_failures = 0
        self._recover_at = 0.0
        self._timeouts = 0

    # -- lifecycle -----------------------------------------------------------------------

    def change_state(self, new: SessionState) -> None:
        old = self.state
        self.state = transition(TRANSITIONS, old, new, "session state")
        log.info("session_state", old=old.value, new=new.value)
        self._sync_attach_file()

    def _sync_attach_file(self) -> None:  # the fast path's view: kept while RUNNING
        if self.attach_file is not None:
            up = self.state is SessionState.RUNNING and self.session_id is not None
            attachfile.sync(self.attach_file, self.user if up else None, limits=self.limits(),
                            tmux=shutil.which(self.settings.tmux) or self.settings.tmux,
                            socket=self.socket, session_id=self.session_id or "",
                            agent_pane=self.agent_pane)

    async def start(self) -> SessionInfo:
        """Create (or adopt) the session. Raises :class:`SessionError` on failure."""
        async with self._lock:
            self.change_state(SessionState.STARTING)  # STOPPED|FAILED -> STARTING
            self._stop.clear()
            try:
                await self._create()
            except SessionError as exc:
                self._fail(exc)
                raise
            with contextlib.suppress(TmuxGone, SessionError):
                # status shows the panes once the session exists, not a look later
                self.snapshot = await self._query()
            self.change_state(SessionState.RUNNING)  # STARTING -> RUNNING
            self._publish_ready()
            return self.describe()

    async def stop(self, timeout: float = 5.0) -> None:
        """Kill the tmux server and everything in it; bounded by ``timeout``."""
        self._stop.set()
        async with self._lock:
            if self.state in (SessionState.STOPPED, SessionState.STOPPING):
                return
            self.change_state(SessionState.STOPPING)
            pids = self._tree_pids()
            with contextlib.suppress(SessionError, TmuxGone):
                await self._tmux("kill-server")
            survivors = await wait_gone(pids, timeout)
            for proc in survivors:
                with contextlib.suppress(*procinfo.PROCESS_GONE):
                    proc.kill()
            if survivors:
                log.warning("session_stop_killed", pids=[p.pid for p in survivors])
                await wait_gone([p.pid for p in survivors], 1.0)
            prompt_mod.remove_prompt_file(self.prompt_file)
            self.change_state(SessionState.STOPPED)  # STOPPING -> STOPPED
            self.session_id = self.agent_pane = self.shell_pane = None
            self.snapshot = None
            log.info("session_stopped", restarts=self.restarts)
            self.events.publish("session.stopped", restarts=dict(self.restarts))

    async def monitor(self) -> None:
        """Watch the session until :meth:`stop`; run it as a task after :meth:`start`."""
        next_tick = time.monotonic()
        while not self._stop.is_set():
            next_tick += self.poll_interval
            try:
                async with self._lock:
                    if self.state in (SessionState.RUNNING, SessionState.RECOVERING):
                        await self.check()
            except Exception:  # a bug here must not end supervision of the agent
                log.exception("session_monitor_crash")
            now = time.monotonic()
            if now > next_tick:
                log.warning("session_tick_overrun", late_s=round(now - next_tick, 3))
                next_tick = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), next_tick - now)

    # -- creation ------------------------------------------------------------------------

    def _resolve_user(self) -> AgentUser:
        if self.user is None:
            try:
                self.user = AgentUser.lookup(self.settings.agent_user, self.settings.home)
            except LookupError as exc:
                raise SessionError(str(exc), "set CODETAINER_AGENT_USER to an existing "
                                   "user") from None
        return self.user

    def _workdir(self) -> str:
        if self._cwd:
            return self._cwd
        repo = Path(self.settings.workspace, "repo")
        return str(repo) if repo.is_dir() else self.settings.workspace

    def _prepare_socket_dir(self, user: AgentUser) -> None:
        prepare_socket_dir(Path(self.socket).parent, user)

    def _agent_argv(self) -> list[str]:
        return ["/bin/sh", "-c",
                prompt_mod.wrapper_script(self.settings.agent_command, self.prompt_file)]

    def _shell_argv(self, env: Mapping[str, str]) -> list[str]:
        shell = env.get("SHELL", "/bin/bash")
        if not os.access(shell, os.X_OK):
            shell = "/bin/sh"
        return [shell, "-l"]

    async def _create(self) -> None:
        user = self._resolve_user()
        tmux = shutil.which(self.settings.tmux)
        if tmux is None:
            raise SessionError(f"tmux not found ({self.settings.tmux!r})",
                               "install tmux in the image or set CODETAINER_TMUX")
        self._prepare_socket_dir(user)
        if await self._adopt():
            return
        cwd = self._workdir()
        if not os.path.isdir(cwd):
            raise SessionError(f"agent working directory {cwd} does not exist",
                               "check the workspace and clone steps")
        if self._prompt is not None and not self._prompt_written:
            try:
                prompt_mod.write_prompt_file(self.prompt_file, self._prompt, user.uid, user.gid)
            except OSError as exc:
                raise SessionError(f"cannot write the prompt file: {exc.strerror}") from None
            self._prompt_written = True
            log.info("session_prompt", sha256=prompt_mod.digest(self._prompt),
                     bytes=len(self._prompt.encode()))
        env = agent_env(user, self.secrets, self.environ, {"COLORTERM": "truecolor"},
                        proxy=AgentProxy.of(self.settings))
        env.pop(prompt_mod.PROMPT_VAR, None)
        argv = setpriv_argv(user, [
            tmux, "-u", "-S", self.socket, "-f", self.config, "new-session", "-d",
            "-s", self.session_name, "-x", "220", "-y", "60", "-c", cwd,
            "-P", "-F", "#{session_id}\t#{pane_id}\t#{pid}", "--", *self._agent_argv(),
        ], self.limits())
        rc, out, err = await run(argv, env=env, cwd=cwd)
        if rc != 0:
            raise SessionError(f"tmux new-session failed: {err.strip() or f'exit {rc}'}",
                               f"run `{tmux} -S {self.socket} ls` as root to inspect")
        try:
            sid, agent_pane, server_pid = out.strip().split("\t")
        except ValueError:
            raise SessionError(f"unexpected tmux output {out.strip()!r}") from None
        try:
            out = await self._tmux(
                "set-option", "-p", "-t", agent_pane, ROLE_OPTION, "agent", ";",
                "split-window", "-v", "-l", "20%", "-t", agent_pane, "-c", cwd,
                "-P", "-F", "#{pane_id}", "--", *self._shell_argv(env))
            shell_pane = out.strip().splitlines()[-1]
            await self._tmux(
                "set-option", "-p", "-t", shell_pane, ROLE_OPTION, "shell", ";",
                "set-option", "-p", "-t", shell_pane, "remain-on-exit", "off", ";",
                "select-pane", "-t", agent_pane)
        except TmuxGone:
            raise SessionError("the tmux server exited right after it started",
                               f"check the agent command ({self.settings.agent_command!r}) "
                               "and the tmux configuration") from None
        self._adopted(sid, agent_pane, shell_pane, int_or_none(server_pid), cwd)

    async def _adopt(self) -> bool:
        """Take over a running session of ours (a restarted daemon finds it alive)."""
        try:
            out = await self._tmux("list-panes", "-a", "-F",
                                   "#{session_id}\t#{pane_id}\t#{" + ROLE_OPTION + "}\t#{pid}")
        except (TmuxGone, SessionError):
            return False
        rows = [line.split("\t") for line in out.splitlines()]
        agent = next((r for r in rows if len(r) == 4 and r[2] == "agent"), None)
        if agent is None:
            return False
        shell = next((r[1] for r in rows if len(r) == 4 and r[0] == agent[0]
                      and r[2] == "shell"), None)
        self._adopted(agent[0], agent[1], shell, int_or_none(agent[3]), self._workdir())
        log.info("session_adopted", id=agent[0], agent_pane=agent[1])
        return True

    def _adopted(self, sid: str, agent_pane: str, shell_pane: str | None,
                 server_pid: int | None, cwd: str) -> None:
        self.session_id, self.agent_pane, self.shell_pane = sid, agent_pane, shell_pane
        self.server_pid, self.cwd = server_pid, cwd
        self.name = self.session_name
        self._pane.started(time.monotonic())
        self.reason, self.hint = "", None

    def _fail(self, exc: SessionError) -> None:
        self.reason, self.hint = exc.reason, exc.hint
        self.change_state(SessionState.FAILED)
        log.error("session_failed", reason=exc.reason, hint=exc.hint)
        self.events.publish("session.failed", reason=exc.reason, hint=exc.hint)

    def _publish_ready(self) -> None:
        log.info("session_ready", id=self.session_id, agent_pane=self.agent_pane,
                 socket=self.socket, cwd=self.cwd, policy=self.policy)
        self.events.publish("session.ready", **self.describe())

    # -- supervision ---------------------------------------------------------------------

    async def check(self) -> None:
        """One supervision step; ``monitor()`` calls it every ``poll_interval``."""
        if self.state is SessionState.RECOVERING:
            await self._recover()
            return
        try:
            snap = await self._query()
            self._timeouts = 0
        except TmuxGone as exc:
            log.warning("session_lost", id=self.session_id, why=str(exc))
            self.events.publish("session.lost", id=self.session_id, reason=str(exc))
            self.change_state(SessionState.RECOVERING)  # RUNNING -> RECOVERING
            self.snapshot = None
            self._recover_at = time.monotonic()
            await self._recover()
            return
        except SessionError as exc:  # tmux hung or misbehaved: give it a few ticks
            self._timeouts += 1
            log.warning("session_query_failed", reason=exc.reason, count=self._timeouts)
            if self._timeouts >= 3 and self.server_pid:
                server = agent_process(self.server_pid, self._resolve_user().uid)
                if server is not None:
                    with contextlib.suppress(*procinfo.PROCESS_GONE):
                        server.kill()
            return
        self.snapshot = snap
        self.name = snap.name
        self.server_pid = snap.server_pid or self.server_pid
        agent = next((p for p in snap.panes if p.id == self.agent_pane), None)
        if agent is None:
            await self._replace_agent_pane(snap)
        elif agent.dead:
            await self._agent_dead(agent)
        else:  # live: a new process (we or an operator respawned it), or a stable run
            self._pane.alive(time.monotonic(), agent.pid)

    async def _agent_dead(self, pane: Pane) -> None:
        now = time.monotonic()
        decided = self._pane.dead(now, pane)
        if decided is not None:
            self._agent_exited(pane, decided)
            return
        if not self._pane.due(now):
            return
        try:
            await self._tmux("respawn-pane", "-t", pane.id, "-c", self.cwd or self._workdir(),
                             "--", *self._agent_argv())
        except (TmuxGone, SessionError) as exc:
            log.warning("session_respawn_failed", pane=pane.id, why=str(exc))
            # a failed start: more backoff, or give up
            self._agent_exited(pane, self._pane.respawn_failed(now, str(exc)))
            return
        self._pane.respawned()
        self.restarts["agent"] += 1
        log.info("session_respawned", pane=pane.id, restarts=self.restarts["agent"])
        self.events.publish("session.respawned", pane=pane.id, restarts=self.restarts["agent"])

    def _agent_exited(self, pane: Pane, decided: AgentExit) -> None:
        fields = {"pane": pane.id, "pid": pane.pid, "status": pane.dead_status,
                  "signal": pane.dead_signal, "ran_s": decided.ran, "action": decided.action}
        log.warning("session_agent_exited", **fields)
        self.events.publish("session.agent_exited", **fields)
        if decided.gave_up:
            self.reason = (f"the agent exited {decided.rapid} times in a row within "
                           f"{self.stable_after:g}s; not restarting it")
            self.hint = (f"look at the agent pane, then `tmux -S {self.socket} "
                         f"respawn-pane -t {pane.id}` to try again")
            log.error("session_agent_gave_up", reason=self.reason)
            self.events.publish("session.gave_up", reason=self.reason, hint=self.hint)

    async def _replace_agent_pane(self, snap: Snapshot) -> None:
        """The agent pane was closed (kill-pane): put a new one back on top."""
        if not self._pane.replaces_closed_pane or not snap.panes:
            return
        other = snap.panes[0].id
        cwd = self.cwd or self._workdir()
        try:
            out = await self._tmux(
                "split-window", "-b", "-v", "-l", "80%", "-t", other, "-c", cwd,
                "-P", "-F", "#{pane_id}", "--", *self._agent_argv())
            pane = out.strip().splitlines()[-1]
            await self._tmux("set-option", "-p", "-t", pane, ROLE_OPTION, "agent", ";",
                             "select-pane", "-t", pane)
        except (TmuxGone, SessionError) as exc:
            log.warning("session_respawn_failed", pane=self.agent_pane, why=str(exc))
            return
        self.agent_pane = pane
        self._sync_attach_file()
        self.restarts["agent"] += 1
        self._pane.started(time.monotonic())
        log.info("session_respawned", pane=pane, restarts=self.restarts["agent"])
        self.events.publish("session.respawned", pane=pane, restarts=self.restarts["agent"])

    async def _recover(self) -> None:
        if time.monotonic() < self._recover_at:
            return
        try:
            await self._create()
        except SessionError as exc:
            self._recover_failures += 1
            delay = backoff.delay(self._recover_failures, self.backoff_base, self.backoff_max)
            self._recover_at = time.monotonic() + delay
            log.warning("session_recreate_failed", reason=exc.reason,
                        attempt=self._recover_failures, retry_in_s=delay)
            if self._recover_failures >= self.recreate_limit:
                self._fail(SessionError(
                    f"could not recreate the tmux session after {self._recover_failures} "
                    f"attempts: {exc.reason}", exc.hint))
            return
        self._recover_failures = 0
        self.restarts["server"] += 1
        self.change_state(SessionState.RUNNING)  # RECOVERING -> RUNNING
        log.info("session_recreated", id=self.session_id, restarts=self.restarts["server"])
        self.events.publish("session.recreated", id=self.session_id,
                            restarts=self.restarts["server"])
        self._publish_ready()

    # -- queries -------------------------------------------------------------------------

    async def _tmux(self, *args: str) -> str:
        """A tmux client command against our server; raises TmuxGone or SessionError."""
        # tmux gives a pane it spawns for a detached client (split-window, respawn-pane)
        # that client's PATH: the daemon's would leak into the agent's panes.
        path = os.environ.get("PATH", "/usr/bin:/bin")
        tmux = shutil.which(self.settings.tmux, path=path) or self.settings.tmux
        path = agent_env(self._resolve_user(), {}, {}, proxy=None)["PATH"]
        argv = setpriv_argv(self._resolve_user(), [tmux, "-u", "-S", self.socket, *args],
                            self.limits())
        rc, out, err = await run(argv, env={"PATH": path})
        if rc != 0:
            msg = err.strip() or f"tmux exited {rc}"
            if any(g in msg for g in GONE):
                raise TmuxGone(msg)
            raise SessionError(f"tmux {args[0]} failed: {msg}")
        return out

    async def _query(self) -> Snapshot:
        if self.session_id is None:
            raise TmuxGone("no session")
        out = await self._tmux("list-panes", "-s", "-t", self.session_id, "-F", PANE_FMT, ";",
                               "list-clients", "-t", self.session_id, "-F", CLIENT_FMT)
        snap = parse_snapshot(out)
        if snap is None or snap.session_id != self.session_id:
            raise TmuxGone(f"session {self.session_id} has no panes")
        return snap

    def _tree_pids(self) -> list[int]:
        pids: list[int] = []
        if self.server_pid and self.user is not None:
            root = agent_process(self.server_pid, self.user.uid)
            if root is not None:
                with contextlib.suppress(*procinfo.PROCESS_GONE):
                    pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
        return pids

    # -- views ---------------------------------------------------------------------------

    def describe(self) -> SessionInfo:
        """Where to attach (also the payload of ``session.ready``)."""
        info: SessionInfo = {
            "exists": self.state is SessionState.RUNNING and self.session_id is not None,
            "socket": self.socket, "id": self.session_id, "name": self.name,
            "agent_pane": self.agent_pane, "state": self.state.value,
            "reason": self.reason, "hint": self.hint}
        if (u := self.user) is not None:  # who a tmux client of it must run as
            info["user"], info["uid"], info["gid"], info["home"] = u.name, u.uid, u.gid, u.home
            info["limits"] = self.limits().as_dict()
        return info

    def attach_target(self) -> dict[str, Any] | None:
        """Where and as whom to attach (``describe()`` less its state) when the session
        is up, else None."""
        info: dict[str, Any] = dict(self.describe())
        return {k: info[k] for k in ("socket", "id", "agent_pane", *TARGET_OWNER) if k in info} \
            if info["exists"] else None

    def _server_gone(self) -> str | None:
        """Why the session's tmux server is gone (None: its process runs, as the agent,
        and its socket is there; or its pid is unknown yet). Read from the kernel: no
        tmux client (an agent exec chain costs ~25 ms)."""
        if self.server_pid is None or self.user is None:
            return None
        import psutil  # at first use, as agent_process's

        proc = agent_process(self.server_pid, self.user.uid)
        with contextlib.suppress(*procinfo.PROCESS_GONE):
            if proc is not None and proc.status() != psutil.STATUS_ZOMBIE:
                return None if os.path.exists(self.socket) else "its socket is gone"
        return f"its server (pid {self.server_pid}) exited"

    async def session_handler(self, req: Request | None = None) -> SessionInfo:
        """Control op ``session``: a live check, so a just-killed server is not reported up
        (a server whose process is gone is told from the kernel, at once; a live one is
        asked for the session's current name)."""
        info = self.describe()
        gone = self._server_gone() if info["exists"] else None
        if info["exists"] and gone is None:
            try:
                out = await self._tmux("display-message", "-p", "-t", str(self.session_id),
                                       "#{session_id}\t#{session_name}")
                _sid, name = out.strip().split("\t", 1)
                info["name"] = self.name = name
            except (TmuxGone, SessionError, ValueError) as exc:
                gone = str(exc)
        if gone is not None:
            info["exists"] = False
            info["reason"] = f"the tmux session is being recreated ({gone})"
        if info["exists"]:
            # root's client loads the agent's seccomp filter too; compiled here already (the
            # session's own chains), so ``attach`` never imports libseccomp (boot/chain.py)
            with contextlib.suppress(SeccompUnavailable):
                info["seccomp_filter"] = filter_hex()
        return info

    def status(self) -> SessionStatus:
        """For ``codetainer status`` (cached tmux view; the agent's CPU, memory and mounts
        sampled at most once a second, see ``UsageCache``)."""
        snap = self.snapshot
        agent = None
        if snap is not None:
            agent = next((p for p in snap.panes if p.id == self.agent_pane), None)
        pid = agent.pid if agent is not None and not agent.dead else None
        uid = self.user.uid if self.user is not None else None
        # every place the agent can write (its tmux directory is a small tmpfs of its own)
        paths = (self.settings.workspace, "/tmp", self.settings.home, str(Path(self.socket).parent))
        # tmux's answer is the agent's to forge: only its own processes are sampled
        tree, mounts = self._usage.sample(
            pid, paths, lambda p: uid is not None and agent_process(p, uid) is not None)
        return {
            **self.describe(),
            "policy": self.policy,
            "cwd": self.cwd,
            "server_pid": self.server_pid,
            "panes": [p.as_dict() for p in snap.panes] if snap else [],
            "clients": snap.clients if snap else [],
            "agent": tree,
            "restarts": dict(self.restarts),
            "gave_up": self._pane.gave_up,  # the pane's FSM is FATAL
            "mounts": mounts,
        }
