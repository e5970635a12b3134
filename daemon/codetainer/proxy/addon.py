"""The mitmproxy addon of the policy proxy: every request of the agent, decided.

Loaded by ``mitmdump -s <this file>`` in the proxy's own process, as the proxy's own
user (the ``exec`` script :mod:`codetainer.proxy.setup` writes); the daemon never
imports it (it is the only module that imports mitmproxy). ``CODETAINER_PROXY_DIR``
names the run directory (``<run_dir>/proxy``).

Per request, at ``requestheaders`` (the body is never buffered, except a GraphQL POST
to api.github.com, whose mutations the GitHub preset reads, decided at ``request``):
the request as :class:`~codetainer.proxy.model.HttpRequest` (Host, TLS server name,
``CONNECT`` target, the address the client connected to), then
:func:`~codetainer.proxy.policy.decide`. Refused: ``403`` with a one-line reason and
``X-Codetainer-Refused``, recorded in ``state/refused.json`` and as one JSON line on
stdout (the daemon logs service output). Allowed: placeholders stripped, the credential
the policy grants put on, the request sent to the host it was decided for (never to an
address the client picked: a shared CDN address reaches nothing else), the response
streamed (server-sent events arrive as sent).

Also refused: a ``CONNECT`` to a host and port no entry allows; a non-HTTP stream
through the proxy; any upstream connection to a host no entry matches (a guard under
the per-request decisions).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from mitmproxy import connection, http, tcp
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import mode_specs, server_hooks

from codetainer.proxy.model import (
    CREDENTIALS_FILE,
    POLICY_FILE,
    REFUSED_FILE,
    Decision,
    HttpRequest,
    ProxyPolicy,
)
from codetainer.proxy.policy import decide, match_entries
from codetainer.proxy.runtime import (
    Credentials,
    PolicyFile,
    RefusedLog,
    path_only,
    rewrite_auth,
    split_authority,
)

ENV_DIR = "CODETAINER_PROXY_DIR"
DEFAULT_DIR = "/run/codetainer/proxy"
PR_SET_DUMPABLE = 4
#: GraphQL bodies the policy reads; a larger one is decided without its body (refused)
MAX_INSPECTED_BODY = 1 << 20
#: a refused request declaring a larger body is cut off rather than answered: answering
#: means reading (buffering) the whole body first
MAX_REFUSED_BODY = 1 << 20
GRAPHQL = ("api.github.com", "POST", "/graphql")
DEFER = "codetainer_decide_with_body"
REFUSED = "codetainer_refused"


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout (the daemon logs it as the service's output)."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def make_undumpable() -> bool:
    """No core dump, no ptrace by the same uid, /proc/<pid>/mem closed: the process
    holds the real tokens."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0


def _declared_size(headers: http.Headers) -> int | None:
    raw = headers.get("content-length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw.strip())


class PolicyProxy:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.policy = PolicyFile(base / POLICY_FILE)
        self.refused = RefusedLog(base / "state" / REFUSED_FILE)
        self.creds = Credentials()
        #: client connection -> the host its CONNECT named (explicit proxy)
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, str] = \
            weakref.WeakKeyDictionary()
        self._flush: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        emit("proxy_loaded", pid=os.getpid(), uid=os.getuid(), undumpable=make_undumpable(),
             dir=str(self.base))
        try:
            self.creds = Credentials.load(self.base / "conf" / CREDENTIALS_FILE)
        except ValueError as exc:
            emit("proxy_credentials_unreadable", error=str(exc),
                 effect="requests go out without the operator's credentials")
        self._policy()

    def done(self) -> None:
        if self.refused.dirty:
            self._write()

    # -- the policy --------------------------------------------------------------------

    def _policy(self) -> ProxyPolicy | None:
        if self.policy.current():
            if self.policy.policy is None:
                emit("proxy_policy_invalid", error=self.policy.error, effect="refusing everything")
            else:
                emit("proxy_policy_loaded", entries=len(self.policy.policy.entries),
                     github_repos=list(self.policy.policy.github_repos))
        return self.policy.policy

    def _decide(self, req: HttpRequest, now: float) -> Decision:
        self.refused.seen()
        policy = self._policy()
        if policy is None:
            return Decision(False, "", "policy unreadable",
                            f"the proxy has no valid policy ({self.policy.error}): everything "
                            "is refused until the daemon writes one")
        return decide(policy, req, now)

    # -- HTTP --------------------------------------------------------------------------

    def _request(self, flow: http.HTTPFlow) -> HttpRequest:
        r = flow.request
        client = flow.client_conn
        host, _ = split_authority(r.host_header or r.host)
        transparent = isinstance(client.proxy_mode, mode_specs.TransparentMode)
        dst = client.sockname[0] if transparent and client.sockname else None
        return HttpRequest(method=r.method.upper(), host=host, path=r.path, port=r.port,
                           scheme=r.scheme, sni=client.sni or None,
                           connect_host=self.tunnels.get(client), dst_ip=dst)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """A tunnel only to a host and port some entry allows (its requests are
        decided one by one inside)."""
        host, _ = split_authority(flow.request.host)
        port = flow.request.port
        now = time.time()
        policy = self._policy()
        if policy is not None and any(port in e.ports for e in match_entries(policy, host, now)):
            self.tunnels[flow.client_conn] = host
            return
        req = HttpRequest("CONNECT", host, "", port, connect_host=host)
        decision = self._decide(req, now)
        if decision.allowed:  # no entry fits, so this cannot be: refuse all the same
            decision = Decision(False, decision.where, "ports", f"no entry allows {host}:{port}")
        self._refuse(flow, req, decision, now)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        req = self._request(flow)
        size = _declared_size(flow.request.headers)
        if (req.host, req.method, path_only(req.path)) == GRAPHQL and \
                (size is None or size <= MAX_INSPECTED_BODY):
            flow.metadata[DEFER] = True  # decided in request(), with the body
            return
        decision = self._decide(req, time.time())
        if not decision.allowed:
            self._refuse(flow, req, decision, time.time(), big=(size or 0) > MAX_REFUSED_BODY)
            return
        self._allow(flow, req, decision)
        flow.request.stream = True

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.pop(DEFER, False) or flow.response is not None:
            return
        try:
            body = flow.request.get_content(strict=True)
        except ValueError:
            body = None  # an encoding it cannot undo: the policy sees no body, refuses
        if body is not None and len(body) > MAX_INSPECTED_BODY:
            body = None
        req = dataclasses.replace(self._request(flow), body=body)
        decision = self._decide(req, time.time())
        if decision.allowed:
            self._allow(flow, req, decision)
        else:
            self._refuse(flow, req, decision, time.time())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and REFUSED not in flow.metadata:
            flow.response.stream = True

    def _allow(self, flow: http.HTTPFlow, req: HttpRequest, decision: Decision) -> None:
        headers = flow.request.headers
        old_auth, old_keys = headers.get_all("authorization"), headers.get_all("x-api-key")
        auth, keys = rewrite_auth(old_auth, old_keys, decision.credential, self.creds)
        if auth != old_auth:
            headers.set_all("authorization", list(auth))
        if keys != old_keys:
            headers.set_all("x-api-key", list(keys))
        if req.host and flow.request.host != req.host:
            # to the host decided on, by name: not to the address the client chose
            flow.request.data.host = req.host

    def _refuse(self, flow: http.HTTPFlow, req: HttpRequest, decision: Decision, now: float,
                *, big: bool = False) -> None:
        where = decision.where or "policy"
        rec = self.refused.record(req.host, req.method, req.path, where=decision.where,
                                  rule=decision.rule, reason=decision.reason, now=now)
        emit("proxy_refused", host=req.host, method=req.method, path=path_only(req.path)[:200],
             where=decision.where, rule=decision.rule, reason=decision.reason, count=rec.count)
        self._schedule()
        flow.metadata[REFUSED] = True
        if big:
            flow.kill()  # type: ignore[no-untyped-call]  # answering would mean reading the whole body first
            return
        text = f"codetainer: refused by {where} {decision.rule}: {decision.reason}\n"
        flow.response = http.Response.make(403, text, {
            "Content-Type": "text/plain; charset=utf-8", "X-Codetainer-Refused": where,
            "Connection": "close"})

    # -- not HTTP ----------------------------------------------------------------------

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        client = flow.client_conn
        host = client.sni or self.tunnels.get(client) or \
            (client.sockname[0] if client.sockname else "")
        self.refused.seen()
        decision = Decision(False, "", "HTTP only",
                            "the proxy passes HTTP and HTTPS only: another protocol to an "
                            "allowlisted name needs that port on its allowlist line (direct TCP)")
        now = time.time()
        rec = self.refused.record(host, "TCP", "", where="", rule=decision.rule,
                                  reason=decision.reason, now=now)
        emit("proxy_refused", host=host, method="TCP", path="", where="", rule=decision.rule,
             reason=decision.reason, count=rec.count)
        self._schedule()
        flow.server_conn.error = "codetainer: not HTTP"  # stops the connect that follows
        if flow.killable:
            flow.kill()  # type: ignore[no-untyped-call]

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Under the per-request decisions: never a connection to a host and port that no
        entry allows, whatever path through mitmproxy led here."""
        address = data.server.address
        if address is None:
            data.server.error = "codetainer: no destination"
            return
        host, port = split_authority(address[0])[0], address[1]
        policy = self._policy()
        if policy is None or not any(port in e.ports
                                     for e in match_entries(policy, host, time.time())):
            data.server.error = f"codetainer: {host}:{port} is not allowlisted"
            emit("proxy_connect_refused", host=host, port=port)

    # -- refused.json ------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._flush is not None:
            return
        delay = self.refused.flush_in(time.monotonic())
        if delay is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()
            return
        self._flush = loop.call_later(delay, self._flushed)

    def _flushed(self) -> None:
        self._flush = None
        self._write()

    def _write(self) -> None:
        try:
            self.refused.write(time.monotonic())
        except OSError as exc:
            emit("proxy_refused_write_failed", path=str(self.refused.path), error=str(exc))
        if self.refused.dirty:  # recorded while writing: not possible in one thread
            self._schedule()


addons = [PolicyProxy(Path(os.environ.get(ENV_DIR) or DEFAULT_DIR))]
