"""Boot side of the policy proxy: the ``proxy`` step, the policy file, status.

The step (fatal; after the network steps, before ``credentials``, so before the root goes
read-only) lays out ``<run_dir>/proxy/``::

    policy.json        0644 root        what the proxy enforces (rendered from the allowlist)
    ca.pem             0644 root        the CA certificate (the agent trusts it)
    ca-bundle.pem      0644 root        the system bundle + ca.pem (SSL_CERT_FILE & co.)
    upstream-ca.pem    0644 root        what the proxy trusts upstream: the system bundle
                                        + CODETAINER_PROXY_UPSTREAM_CA
    exec               0755 root        the [program:proxy] command
    conf/              0700 proxy user  mitmproxy-ca.pem (CA key + certificate, 0400),
                                        credentials.json (0400)
    state/             0755 proxy user  refused.json (the proxy writes it)

The CA is new at every boot (EC P-256, ten years, ``openssl``), on the run directory's
tmpfs; its key is readable by the proxy's user alone. It goes into the system store
(``update-ca-certificates``) for tools that read only that. Then the step starts the
``proxy`` service and waits until both ports accept connections.

Afterwards :meth:`ProxyController.render` follows the network: the network controller
calls it after every re-plan (reload, temporary grants, their expiry), and the proxy
re-reads ``policy.json`` within half a second of a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from codetainer import backoff, runner
from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.filesystem import write_file
from codetainer.proxy.model import (
    CREDENTIALS_FILE,
    POLICY_FILE,
    PROXY_PORT,
    REFUSED_FILE,
    REPO_ID,
    TRANSPARENT_PORT,
    ProxyPolicy,
)
from codetainer.proxy.runtime import read_refused
from codetainer.services.manager import UnknownService
from codetainer.services.states import ProcessState

if TYPE_CHECKING:
    from codetainer.events import EventBus
    from codetainer.network.allowlist import Allowlist
    from codetainer.network.controller import NetworkController
    from codetainer.services.manager import ServiceManager
    from codetainer.settings import Settings
    from codetainer.status import ProxyStatus

log = structlog.get_logger("codetainer.proxy")

SERVICE = "proxy"
CA_FILE = "ca.pem"
CA_BUNDLE_FILE = "ca-bundle.pem"
UPSTREAM_CA_FILE = "upstream-ca.pem"
MITM_CA_FILE = "mitmproxy-ca.pem"  # mitmproxy's name in its confdir: key + certificate
EXEC_FILE = "exec"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
SYSTEM_CA_NAME = "codetainer-proxy.crt"
CA_DAYS = 3650
START_TIMEOUT = 30.0
TOOL_TIMEOUT = 120.0
REFUSED_SHOWN = 10
#: the repository lookup: attempts in all (the step's and the background's), and the
#: waits between them: 2, 5, 12.5, 31, 78, 120 seconds
LOOKUP_ATTEMPTS = 7
LOOKUP_WAIT = wait_exponential(multiplier=2.0, exp_base=2.5, max=120.0)
LOOKUP_ERRORS = (OSError, TimeoutError, ValueError)
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL)


def proxy_dir(settings: Settings) -> Path:
    return Path(settings.run_dir, "proxy")


def proxy_enabled(settings: Settings) -> bool:
    """CODETAINER_PROXY=on (parsed with the settings: a bad value exits 64 at start)."""
    return settings.proxy


# --- pure parts ---------------------------------------------------------------------------


def render_policy(allow: Allowlist, grant_expiry: Mapping[str, float],
                  github_repos: Sequence[str] = (), github_repo_ids: Sequence[str] = (),
                  github_ranges: Sequence[str] = ()) -> ProxyPolicy:
    """The proxy's policy from the effective allowlist. ``grant_expiry``: wall-clock
    expiry by ``str(entry)`` of the temporary grants (``codetainer allow``)."""
    from codetainer.network.allowlist import policy_entry
    from codetainer.network.ops import GRANT_SOURCE

    entries = tuple(
        policy_entry(e, grant_expiry.get(str(e)) if e.source == GRANT_SOURCE else None)
        for e in allow.entries)
    return ProxyPolicy(entries, tuple(dict.fromkeys(r.lower() for r in github_repos)),
                       tuple(github_ranges), tuple(dict.fromkeys(github_repo_ids)))


def pem_certificates(text: str) -> list[str]:
    return [m.group(0) for m in _PEM.finditer(text)]


def _same(a: str) -> str:
    return "".join(a.split())


def bundle(*groups: Sequence[str], drop: Sequence[str] = ()) -> str:
    """PEM certificates, de-duplicated, without those in ``drop``."""
    gone = {_same(c) for c in drop}
    seen: dict[str, str] = {}
    for group in groups:
        for cert in group:
            key = _same(cert)
            if key not in gone:
                seen.setdefault(key, cert)
    return "".join(c + "\n" for c in seen.values())


def listen_hosts() -> list[str]:
    """127.0.0.1, and ::1 where the loopback has IPv6."""
    hosts = ["127.0.0.1"]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        hosts.append("::1")
    return hosts


def exec_script(base: Path, uid: int, gid: int, hosts: Sequence[str],
                mitmdump: str | None = None) -> str:
    """``[program:proxy]``'s command: mitmdump as the proxy's user, with the addon, an
    empty environment but for what it needs (no secret: the tokens come from a file)."""
    from codetainer import proxy

    binary = mitmdump or str(Path(sys.executable).parent / "mitmdump")
    addon = Path(proxy.__file__).with_name("addon.py")
    modes: list[str] = []
    for host in hosts:
        modes += ["--mode", f"regular@{host}:{PROXY_PORT}",
                  "--mode", f"transparent@{host}:{TRANSPARENT_PORT}"]
    options = {"confdir": base / "conf", "connection_strategy": "lazy",
               "ssl_verify_upstream_trusted_ca": base / UPSTREAM_CA_FILE,
               "onboarding": "false", "flow_detail": "0", "termlog_verbosity": "warn"}
    argv = [binary, *modes, "-s", str(addon)]
    for key, value in options.items():
        argv += ["--set", f"{key}={value}"]
    env = ["PATH=/usr/bin:/bin", f"HOME={base / 'state'}", "LANG=C.UTF-8",
           "PYTHONDONTWRITEBYTECODE=1", f"CODETAINER_PROXY_DIR={base}"]
    return ("#!/bin/sh\n"
            "# generated by codetainer at boot (the proxy step): the policy proxy\n"
            f"exec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all "
            "--no-new-privs /usr/bin/env -i "
            + " ".join(shlex.quote(a) for a in [*env, *argv]) + "\n")


async def _tool(argv: Sequence[str], timeout: float = TOOL_TIMEOUT) -> tuple[int, str]:
    """Run a tool (the one runner); (exit code, stderr+stdout tail), -1 and why when it
    could not start or did not finish (its whole process group is killed then)."""
    try:
        done = await runner.run(argv, timeout=timeout, merge_stderr=True)
    except runner.SpawnError as exc:
        return -1, str(exc)
    if done.timed_out:
        return -1, f"{argv[0]} did not finish within {timeout:.0f}s"
    return done.code, done.stdout.strip()[-500:]


def listening(host: str, port: int, proc_net: Path = Path("/proc/net")) -> bool:
    """Whether a TCP socket listens on host:port in this network namespace. The
    transparent port is checked this way: a connection that the firewall did not
    redirect has no original destination, which mitmproxy logs as a failure."""
    want = ipaddress.ip_address(host)
    name = "tcp6" if want.version == 6 else "tcp"
    try:
        lines = (proc_net / name).read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN
            continue
        addr_hex, _, port_hex = fields[1].partition(":")
        raw = bytes.fromhex(addr_hex)
        # the kernel prints each 32-bit word in host (little-endian) order
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        addr = ipaddress.ip_address(words)
        if int(port_hex, 16) == port and (addr == want or addr.is_unspecified):
            return True
    return False


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# --- the controller -----------------------------------------------------------------------


class ProxyController:
    def __init__(self, settings: Settings, events: EventBus, services: ServiceManager,
                 network: NetworkController) -> None:
        self.settings = settings
        self.events = events
        self.services = services
        self.network = network
        self.dir = proxy_dir(settings)
        self.github_repos: tuple[str, ...] = ()
        self.github_repo_ids: tuple[str, ...] = ()
        self.hosts: list[str] = []
        self.started = False
        self._rendered: str | None = None
        self._policy: ProxyPolicy | None = None
        self._retry: asyncio.Task[None] | None = None
        self._refused: tuple[tuple[int, int], dict[str, Any]] | None = None
        network.on_change.append(self.render)
        # `codetainer why URL` decides by the policy the proxy runs, and shows its refusals
        network.ops.proxy_policy = self.policy
        network.ops.proxy_refused = lambda: list(self._read_refused()["refused"])

    def steps(self) -> list[Step]:
        return [Step("proxy", self._step, timeout=START_TIMEOUT + TOOL_TIMEOUT,
                     policy=Policy.FATAL, requires=("network-config",),
                     description="CA, policy and credentials of the policy proxy; start it")]

    # -- the step ------------------------------------------------------------------------

    def _user(self) -> tuple[int, int]:
        name = self.settings.proxy_user
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise StepError(f"the proxy's user {name!r} (CODETAINER_PROXY_USER) does not exist",
                            "create it (useradd --system codetainer-proxy), name an existing "
                            "dedicated user, or set CODETAINER_PROXY=off") from None
        setup = self.network.net
        others = {0: "root", setup.opts.dns_uid if setup else -1: "the DNS server"}
        with contextlib.suppress(KeyError):
            others[pwd.getpwnam(self.settings.agent_user).pw_uid] = "the agent"
        if pw.pw_uid in others:
            raise StepError(f"the proxy's user {name!r} (uid {pw.pw_uid}) is {others[pw.pw_uid]}'s: "
                            "the firewall tells them apart by uid",
                            "set CODETAINER_PROXY_USER to a dedicated user")
        return pw.pw_uid, pw.pw_gid

    def _layout(self, uid: int, gid: int) -> None:
        for path, owner, mode in ((self.dir, (0, 0), 0o755), (self.dir / "conf", (uid, gid), 0o700),
                                  (self.dir / "state", (uid, gid), 0o755)):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, *owner)
            os.chmod(path, mode)

    async def _make_ca(self, uid: int, gid: int) -> str:
        """A new CA: key + certificate for mitmproxy (0400, the proxy's user), the
        certificate alone in ca.pem. Returns the certificate (PEM)."""
        if shutil.which("openssl") is None:
            raise StepError("openssl is not installed: the proxy's CA cannot be made",
                            "install openssl, or set CODETAINER_PROXY=off")
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "container"
        work = Path(tempfile.mkdtemp(prefix=".ca-", dir=self.dir))  # 0700 root
        try:
            key, cert = work / "key.pem", work / "cert.pem"
            rc, out = await _tool([
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-sha256", "-days", str(CA_DAYS), "-keyout", str(key), "-out", str(cert),
                "-subj", f"/O=codetainer/CN=codetainer proxy CA {host}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            if rc != 0:
                raise StepError(f"openssl could not make the proxy's CA (exit {rc}): {out}")
            pem = cert.read_text()
            write_file(self.dir / "conf" / MITM_CA_FILE, key.read_text() + pem, 0o400, uid, gid)
            write_file(self.dir / CA_FILE, pem, 0o644, 0, 0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return pem

    def _upstream_extra(self) -> list[str]:
        path = self.settings.proxy_upstream_ca.strip()
        if not path:
            return []
        try:
            certs = pem_certificates(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise StepError(f"cannot read CODETAINER_PROXY_UPSTREAM_CA={path}: {exc}",
                            "name a readable PEM file, or leave it empty") from None
        if not certs:
            raise StepError(f"CODETAINER_PROXY_UPSTREAM_CA={path} holds no PEM certificate",
                            "name a PEM file (-----BEGIN CERTIFICATE-----)")
        return certs

    def _trust(self, ca_pem: str) -> None:
        """upstream-ca.pem (what the proxy trusts upstream) and ca-bundle.pem (the
        system's CAs and ours: what the agent's tools are told to trust)."""
        system = pem_certificates(SYSTEM_BUNDLE.read_text(errors="replace")) \
            if SYSTEM_BUNDLE.exists() else []
        installed = LOCAL_CA_DIR / SYSTEM_CA_NAME
        old = pem_certificates(installed.read_text(errors="replace")) if installed.exists() else []
        extra = self._upstream_extra()
        upstream = bundle(system, extra, drop=[*old, ca_pem])
        if not upstream:
            raise StepError(f"no CA to verify servers with: {SYSTEM_BUNDLE} is missing or empty",
                            "install ca-certificates, or set CODETAINER_PROXY_UPSTREAM_CA")
        write_file(self.dir / UPSTREAM_CA_FILE, upstream, 0o644, 0, 0)
        write_file(self.dir / CA_BUNDLE_FILE, bundle(system, [ca_pem], drop=old), 0o644, 0, 0)

    async def _install(self, ca_pem: str) -> str:
        """The CA into the system store (for tools that read only that); a note on it.
        Runs while the proxy starts: the proxy and the agent's variables use the bundles
        :meth:`_trust` wrote, not the store."""
        installed = LOCAL_CA_DIR / SYSTEM_CA_NAME
        tool = shutil.which("update-ca-certificates")
        if tool is None:
            return "update-ca-certificates is missing: the system store lacks the CA"
        try:
            write_file(installed, ca_pem, 0o644, 0, 0)
        except OSError as exc:
            return f"the system store lacks the CA ({installed}: {exc.strerror or exc})"
        rc, out = await _tool([tool])
        if rc != 0:
            return f"update-ca-certificates failed (exit {rc}): {out[-200:]}"
        return "CA in the system store"

    def _credentials(self, secrets: Mapping[str, str], uid: int, gid: int) -> list[str]:
        github = secrets.get("GH_PAT") or secrets.get("GH_TOKEN") or ""
        anthropic = secrets.get("CLAUDE_CODE_OAUTH_TOKEN") or ""
        write_file(self.dir / "conf" / CREDENTIALS_FILE,
                   json.dumps({"github": github, "anthropic": anthropic}), 0o400, uid, gid)
        return [n for n, v in (("GH_PAT", github), ("CLAUDE_CODE_OAUTH_TOKEN", anthropic)) if not v]

    def _repos_from_env(self, secrets: Mapping[str, str]) -> str | None:
        """REPO_URL's ``owner/repo`` when it is a GitHub repository (None otherwise)."""
        from codetainer.boot.repository import github_slug

        url = secrets.get("REPO_URL") or os.environ.get("REPO_URL", "").strip()
        slug = github_slug(url, self.settings.github_url) if url else None
        if slug is None:
            return None
        self.github_repos = (f"{slug[0]}/{slug[1]}".lower(),)
        return self.github_repos[0]

    async def _lookup_repos(self, slug: str, token: str) -> str:
        """The repository's GraphQL node ID and, for a fork, its upstream (slug and ID),
        from the GitHub API: what the GitHub preset needs to let writes there pass."""
        from codetainer.boot.repository import FULL_NAME_RE, api_get

        timeout = self.settings.github_api_timeout
        url = f"{self.settings.github_api_url.rstrip('/')}/repos/{slug}"
        info = await api_get(url, token, timeout)
        if not isinstance(info, dict):
            raise ValueError("the API reply is not an object")
        repos, ids = [slug], []
        for repo in (info, info.get("parent") if info.get("fork") else None):
            if not isinstance(repo, dict):
                continue
            name, node = repo.get("full_name"), repo.get("node_id")
            if repo is not info and isinstance(name, str) and FULL_NAME_RE.fullmatch(name):
                repos.append(name.lower())
            if isinstance(node, str) and REPO_ID.match(node):
                ids.append(node)
        self.set_github_repos(repos, ids)
        return f"GitHub writes to {', '.join(repos)} ({len(ids)} node IDs)"

    async def _repos(self, slug: str, token: str) -> str:
        """Look the repository up now; if that fails, keep trying in the background (until
        then GraphQL mutations are refused: their repository cannot be told)."""
        from codetainer.log import redact

        try:
            return await self._lookup_repos(slug, token)
        except LOOKUP_ERRORS as exc:
            failed: Exception = exc
            why = redact(str(exc) or type(exc).__name__, {"t": token})
        log.warning("proxy_repo_lookup_failed", repo=slug, reason=why)
        self._retry = asyncio.create_task(self._retry_lookup(slug, token, failed),
                                          name="proxy:repos")
        return f"GitHub writes to {slug}; its node ID unknown yet ({why}): retrying"

    async def _retry_lookup(self, slug: str, token: str, failed: Exception) -> None:
        """The one backoff (tenacity); the step's failed lookup is attempt 1."""
        retrying = AsyncRetrying(stop=stop_after_attempt(LOOKUP_ATTEMPTS), wait=LOOKUP_WAIT,
                                 retry=retry_if_exception_type(LOOKUP_ERRORS), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise failed  # made already, by _repos: only its wait is left
                    note = await self._lookup_repos(slug, token)
        except LOOKUP_ERRORS:
            log.error("proxy_repo_lookup_gave_up", repo=slug,
                      effect="GraphQL mutations (gh pr create) are refused")
            return
        log.info("proxy_repo_lookup_done", repo=slug, note=note)

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(BaseException):
                await self._retry

    async def _step(self, ctx: BootContext) -> str:
        uid, gid = self._user()
        try:
            svc = self.services.get(SERVICE)
        except UnknownService as exc:
            raise StepError(exc.message, "add [program:proxy] (command=<run_dir>/proxy/exec) "
                            "to the services file, or set CODETAINER_PROXY=off") from None
        exec_path = self.dir / EXEC_FILE
        if svc.config.command[0] != str(exec_path):
            raise StepError(f"[program:proxy] runs {svc.config.command[0]}, but the exec script "
                            f"is {exec_path} (CODETAINER_RUN_DIR)",
                            f"set command={exec_path} in the services file")
        try:
            self._layout(uid, gid)
            ca_pem = await self._make_ca(uid, gid)
            self._trust(ca_pem)
            missing = self._credentials(ctx.secrets, uid, gid)
            slug = self._repos_from_env(ctx.secrets)
            self.hosts = listen_hosts()
            write_file(exec_path, exec_script(self.dir, uid, gid, self.hosts), 0o755, 0, 0)
            self._rendered = None
            self.render(strict=True)
        except OSError as exc:
            raise StepError(f"cannot lay out {self.dir}: {exc}") from None
        ctx.started_by_steps.append(SERVICE)
        ctx.teardowns["proxy"] = self.close
        token = ctx.secrets.get("GH_PAT") or ctx.secrets.get("GH_TOKEN")
        # While mitmproxy starts (most of this step): the system store, and the
        # repository's node IDs (the policy file follows; the proxy re-reads it).
        side = [asyncio.create_task(self._install(ca_pem), name="proxy:store")]
        if slug is not None and token:
            side.append(asyncio.create_task(self._repos(slug, token), name="proxy:repos"))
        t0 = time.monotonic()
        try:
            await self._start(svc)
            up = time.monotonic() - t0
            notes = [await t for t in side]
        finally:
            for t in side:
                t.cancel()
        self.started = True
        notes += [f"{n} not loaded: the proxy adds no such credential" for n in missing]
        return (f"{self.settings.proxy_user} on {', '.join(self.hosts)} ports {PROXY_PORT} "
                f"(proxy), {TRANSPARENT_PORT} (transparent), listening in "
                f"{up:.1f}s; {'; '.join(notes)}")

    async def _start(self, svc: Any) -> None:
        """Start the service; return once every port listens and it is RUNNING (the
        supervisor retries a process that exits; the step fails at FATAL or the deadline)."""
        self.services.start(SERVICE)
        pending = [(h, p) for h in self.hosts for p in (PROXY_PORT, TRANSPARENT_PORT)]
        up = False

        async def serving() -> bool:  # or FATAL: nothing to wait for then
            nonlocal pending, up
            state = svc.state
            if state in (ProcessState.STARTING, ProcessState.RUNNING):
                pending = [(h, p) for h, p in pending if not (
                    await _accepts(h, p) if p == PROXY_PORT else listening(h, p))]
                up = not pending  # serving; RUNNING follows at startsecs (the supervisor's)
            return up or state is ProcessState.FATAL

        await backoff.until(serving, timeout=svc.config.startsecs + START_TIMEOUT)
        if up:
            return
        tail = " | ".join(list(svc.tail)[-3:])
        err = f" ({svc.fsm.spawnerr})" if svc.fsm.spawnerr else ""
        waiting = ", ".join(f"{h}:{p}" for h, p in pending)
        raise StepError(f"the proxy did not start: {svc.state.name}{err}"
                        + (f"; not listening on {waiting}" if waiting else "")
                        + (f"; output: {tail}" if tail else ""),
                        "see the proxy service in `codetainer status`")

    # -- afterwards --------------------------------------------------------------------

    def render(self, strict: bool = False) -> bool:
        """Write policy.json from the network's effective allowlist; True if it changed.
        Called by the network controller after each re-plan (a no-op before the step)."""
        if not strict and self._rendered is None:
            return False
        net = self.network
        expiry = {key: g.expires_at for key, g in net.ops.grants.items()}
        github = net.net.github if net.net else None
        ranges = [str(n) for n in github.networks] if github else []
        policy = render_policy(net.effective(), expiry, self.github_repos, self.github_repo_ids,
                               ranges)
        text = policy.to_json()
        if text == self._rendered:
            return False
        try:
            write_file(self.dir / POLICY_FILE, text, 0o644, 0, 0)
        except OSError as exc:
            if strict:
                raise
            log.error("proxy_policy_write_failed", path=str(self.dir / POLICY_FILE), error=str(exc))
            return False
        self._rendered, self._policy = text, policy
        log.info("proxy_policy_written", entries=text.count('"kind"'), repos=list(self.github_repos))
        return True

    def policy(self) -> ProxyPolicy | None:
        """The policy last written (None before the step wrote one)."""
        return self._policy

    def set_github_repos(self, repos: Sequence[str], repo_ids: Sequence[str] = ()) -> None:
        """The repositories the GitHub preset lets the agent write to (REPO_URL's, and
        its upstream once the repository step knows it), with their GraphQL node IDs."""
        self.github_repos = tuple(dict.fromkeys([*self.github_repos, *(r.lower() for r in repos)]))
        self.github_repo_ids = tuple(dict.fromkeys([*self.github_repo_ids, *repo_ids]))
        self.render()

    def status(self) -> ProxyStatus:
        """The ``proxy`` section of status: service state, ports, the latest refusals."""
        try:
            state = self.services.get(SERVICE).state.name
        except UnknownService:
            state = "absent"
        ref = self._read_refused()
        out: ProxyStatus = {"state": state, "ports": [PROXY_PORT, TRANSPARENT_PORT],
                            "requests": ref["requests"], "refused_total": ref["refused_total"],
                            "refused": ref["refused"][:REFUSED_SHOWN]}
        if "error" in ref:
            out["error"] = ref["error"]
        degraded = self.degraded(state)
        if degraded:
            out["degraded"] = degraded
        return out

    def degraded(self, state: str | None = None) -> str | None:
        """Why the machine is degraded now because of the proxy (None: it is not): after
        the step, a proxy that is not RUNNING (the agent's HTTP(S) fails meanwhile)."""
        if not self.started:
            return None
        if state is None:
            try:
                state = self.services.get(SERVICE).state.name
            except UnknownService:
                state = "absent"
        if state in (ProcessState.RUNNING.name, ProcessState.STARTING.name):
            return None  # STARTING: listening, before startsecs (a crash shows as BACKOFF)
        return f"the policy proxy is {state}: the agent's HTTP(S) fails until it runs again"

    def _read_refused(self) -> dict[str, Any]:
        path = self.dir / "state" / REFUSED_FILE
        try:
            st = os.stat(path)
        except OSError:
            return {"requests": 0, "refused_total": 0, "refused": []}
        sig = (st.st_mtime_ns, st.st_ino)
        if self._refused is None or self._refused[0] != sig:
            try:
                data = read_refused(path)
            except (OSError, ValueError) as exc:
                return {"requests": 0, "refused_total": 0, "refused": [],
                        "error": f"{path}: {exc}"}
            self._refused = (sig, {"requests": data.get("requests", 0),
                                   "refused_total": data.get("refused_total", 0),
                                   "refused": data["refused"]})
        return dict(self._refused[1])
