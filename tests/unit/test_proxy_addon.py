"""The policy proxy's process side (codetainer.proxy.runtime, .addon) and the boot side's
pure parts (codetainer.proxy.setup): credentials, placeholders, refusals, policy reload.

The addon's hooks are driven with mitmproxy's own test flows (mitmproxy.test.tflow): the
real HTTPFlow objects the proxy hands them, no proxy server.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import pytest
from codetainer.network.allowlist import Allowlist, parse_entry
from codetainer.network.ops import GRANT_SOURCE
from codetainer.proxy import setup
from codetainer.proxy.model import (
    ANTHROPIC_PLACEHOLDER,
    CREDENTIAL_ANTHROPIC,
    CREDENTIAL_GITHUB_API,
    CREDENTIAL_GITHUB_GIT,
    CREDENTIAL_NONE,
    GITHUB_PLACEHOLDER,
    PolicyEntry,
    ProxyPolicy,
    Rules,
)
from codetainer.proxy.runtime import (
    MAX_RECORDS,
    WRITE_INTERVAL_S,
    WRITE_SETTLE_S,
    Credentials,
    PolicyFile,
    RefusedLog,
    holds_placeholder,
    read_refused,
    rewrite_auth,
    split_authority,
)

CREDS = Credentials(github="ghp_REALgithub", anthropic="sk-ant-oat01-REAL")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- credentials and placeholders -----------------------------------------------------------


@pytest.mark.parametrize("value", [
    f"Bearer {ANTHROPIC_PLACEHOLDER}",
    f"token {GITHUB_PLACEHOLDER}",
    GITHUB_PLACEHOLDER,
    f"Basic {b64('x-access-token:' + GITHUB_PLACEHOLDER)}",
    f"basic {b64('x-access-token:' + GITHUB_PLACEHOLDER).rstrip('=')}",  # unpadded
    f"Basic {b64(ANTHROPIC_PLACEHOLDER + ':x')}",
])
def test_placeholders_are_found_in_clear_and_in_basic_auth(value: str) -> None:
    assert holds_placeholder(value)


@pytest.mark.parametrize("value", ["Bearer sk-ant-other", f"Basic {b64('me:secret')}",
                                   "Basic !!!not-base64", "", "token ghp_attacker"])
def test_other_values_are_not_placeholders(value: str) -> None:
    assert not holds_placeholder(value)


def test_placeholders_never_leave_whatever_the_decision() -> None:
    auth = [f"Bearer {ANTHROPIC_PLACEHOLDER}", "Bearer sk-ant-own"]
    keys = [ANTHROPIC_PLACEHOLDER]
    assert rewrite_auth(auth, keys, CREDENTIAL_NONE, CREDS) == (["Bearer sk-ant-own"], [])
    basic = [f"Basic {b64('x-access-token:' + GITHUB_PLACEHOLDER)}"]
    assert rewrite_auth(basic, [], CREDENTIAL_NONE, CREDS) == ([], [])


def test_github_git_credential_replaces_what_the_agent_sent() -> None:
    auth, keys = rewrite_auth(["token ghp_attacker"], [], CREDENTIAL_GITHUB_GIT, CREDS)
    assert auth == [f"Basic {b64('x-access-token:ghp_REALgithub')}"]
    assert keys == []


def test_github_api_credential() -> None:
    auth, _ = rewrite_auth([f"token {GITHUB_PLACEHOLDER}"], [], CREDENTIAL_GITHUB_API, CREDS)
    assert auth == ["token ghp_REALgithub"]


def test_anthropic_credential_is_a_bearer_and_drops_api_keys() -> None:
    auth, keys = rewrite_auth([], ["sk-ant-api-someone-else", ANTHROPIC_PLACEHOLDER],
                              CREDENTIAL_ANTHROPIC, CREDS)
    assert (auth, keys) == (["Bearer sk-ant-oat01-REAL"], [])


def test_a_credential_not_configured_adds_nothing() -> None:
    empty = Credentials()
    auth, keys = rewrite_auth([f"Bearer {ANTHROPIC_PLACEHOLDER}"], [], CREDENTIAL_ANTHROPIC, empty)
    assert (auth, keys) == ([], [])


def test_credentials_file_errors_never_quote_it(tmp_path: Path) -> None:
    p = tmp_path / "credentials.json"
    p.write_text("ghp_SECRET not json")
    with pytest.raises(ValueError) as exc:
        Credentials.load(p)
    assert "ghp_SECRET" not in str(exc.value)
    p.write_text(json.dumps({"github": " ghp_x \n", "anthropic": "sk"}))
    assert Credentials.load(p) == Credentials("ghp_x", "sk")
    with pytest.raises(ValueError, match="cannot read"):
        Credentials.load(tmp_path / "missing.json")


@pytest.mark.parametrize(("authority", "expected"), [
    ("Example.COM", ("example.com", None)),
    ("example.com:8443", ("example.com", 8443)),
    ("example.com.", ("example.com", None)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("[2001:DB8::1]", ("2001:db8::1", None)),
    ("203.0.113.5:80", ("203.0.113.5", 80)),
    ("2001:db8::1", ("2001:db8::1", None)),
])
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority) == expected


# --- refused requests -----------------------------------------------------------------------


def test_refusals_are_counted_per_host_method_path_and_entry(tmp_path: Path) -> None:
    log = RefusedLog(tmp_path / "refused.json")
    for i in range(3):
        log.seen()
        log.record("api.github.com", "POST", f"/gists?token=secret{i}", where="d:3",
                   rule="preset=github", reason="no", now=100.0 + i)
    log.seen()
    log.record("api.github.com", "POST", "/gists", where="CODETAINER_ALLOW:1", rule="r",
               reason="no", now=200.0)
    snap = log.snapshot()
    assert snap["requests"] == 4 and snap["refused_total"] == 4
    first, second = snap["refused"]  # most recent first
    assert (first["where"], first["count"]) == ("CODETAINER_ALLOW:1", 1)
    assert (second["path"], second["count"], second["first"], second["last"]) == \
        ("/gists", 3, 100.0, 102.0)
    assert "secret" not in json.dumps(snap)  # the query is never recorded


def test_refusals_keep_the_most_recent_keys(tmp_path: Path) -> None:
    log = RefusedLog(tmp_path / "refused.json")
    log.record("h", "GET", "/keep", where="", rule="r", reason="x", now=0.0)
    for i in range(MAX_RECORDS + 10):
        log.record("h", "GET", f"/{i}", where="", rule="r", reason="x", now=float(i))
        if i == 20:  # touched again: recent, kept
            log.record("h", "GET", "/keep", where="", rule="r", reason="x", now=20.5)
    assert len(log.records) == MAX_RECORDS
    paths = {r.path for r in log.records.values()}
    assert "/keep" in paths and "/0" not in paths and f"/{MAX_RECORDS + 9}" in paths
    assert log.refused_total == MAX_RECORDS + 12


def test_refused_writes_are_debounced(tmp_path: Path) -> None:
    log = RefusedLog(tmp_path / "refused.json")
    assert log.flush_in(0.0) is None  # nothing to write
    log.record("h", "GET", "/", where="", rule="r", reason="x", now=1.0)
    assert log.flush_in(10.0) == WRITE_SETTLE_S  # first change: written shortly after
    log.write(10.0)
    assert log.flush_in(10.1) is None
    log.record("h", "GET", "/", where="", rule="r", reason="x", now=2.0)
    assert log.flush_in(10.1) == pytest.approx(WRITE_INTERVAL_S - 0.1)  # at most every 0.5 s
    assert log.flush_in(11.0) == WRITE_SETTLE_S


def test_refused_file_is_replaced_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "refused.json"
    assert read_refused(path)["refused"] == []
    log = RefusedLog(path)
    log.seen()
    log.record("sentry.io", "POST", "/api/1/store/", where="", rule="not allowlisted",
               reason="no", now=5.0)
    log.write(1.0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    data = read_refused(path)
    assert data["requests"] == 1 and data["refused"][0]["host"] == "sentry.io"
    assert [p.name for p in tmp_path.iterdir()] == ["refused.json"]  # no temporary left
    path.write_text("[]")
    with pytest.raises(ValueError):
        read_refused(path)


# --- policy.json ------------------------------------------------------------------------------


def _policy(*entries: PolicyEntry) -> str:
    return ProxyPolicy(entries).to_json()


def test_policy_file_is_reread_when_it_changes_at_most_every_half_second(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(_policy(PolicyEntry("host", "a.example", (443,), "d:1")))
    pf = PolicyFile(path)
    assert pf.current(now=100.0) and pf.policy is not None
    assert [e.value for e in pf.policy.entries] == ["a.example"]
    path.write_text(_policy(PolicyEntry("host", "b.example", (443,), "d:1"),
                            PolicyEntry("host", "c.example", (443,), "d:2")))
    assert not pf.current(now=100.2)  # too soon to look
    assert pf.current(now=100.6)
    assert [e.value for e in pf.policy.entries] == ["b.example", "c.example"]
    assert not pf.current(now=101.2)  # unchanged


def test_an_invalid_or_missing_policy_refuses_everything(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    pf = PolicyFile(path)
    assert pf.current(now=0.0) and pf.policy is None and "cannot read" in pf.error
    path.write_text('{"version": 1, "entries": [{"kind": "host"}]}')
    assert pf.current(now=1.0) and pf.policy is None and "invalid" in pf.error
    path.write_text(_policy(PolicyEntry("host", "a.example", (443,), "d:1")))
    assert pf.current(now=2.0) and pf.policy is not None
    path.unlink()
    assert pf.current(now=3.0) and pf.policy is None


# --- the addon's hooks, on mitmproxy's own flow objects -----------------------------------------


@pytest.fixture
def addon(tmp_path: Path):  # type: ignore[no-untyped-def]
    from codetainer.proxy.addon import PolicyProxy

    (tmp_path / "state").mkdir()
    policy = ProxyPolicy((
        PolicyEntry("host", "api.anthropic.com", (443,), "domains.conf:1", Rules(preset="anthropic")),
        PolicyEntry("host", "example.com", (443,), "CODETAINER_ALLOW:1", Rules(methods=("GET",))),
    ))
    (tmp_path / "policy.json").write_text(policy.to_json())
    proxy = PolicyProxy(tmp_path)
    proxy.creds = CREDS
    return proxy


def _flow(host: str, method: str = "GET", path: str = "/", headers: tuple[tuple[bytes, bytes], ...] = (),
          content: bytes = b""):  # type: ignore[no-untyped-def]
    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    req = tutils.treq(host=host, port=443, scheme=b"https", method=method.encode(),
                      path=path.encode(), content=content,
                      headers=http.Headers(((b"host", host.encode()), *headers)))
    flow = tflow.tflow(req=req)
    flow.client_conn.sni = host
    return flow


def test_hook_refuses_with_403_reason_and_header(addon) -> None:  # type: ignore[no-untyped-def]
    flow = _flow("example.com", "POST", "/upload?x=1", content=b"data")
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers["X-Codetainer-Refused"] == "CODETAINER_ALLOW:1"
    assert flow.response.text.startswith("codetainer: refused by CODETAINER_ALLOW:1 methods=GET: ")
    addon.done()  # written at the end at the latest
    data = read_refused(addon.refused.path)
    assert data["refused"][0]["path"] == "/upload" and data["refused_total"] == 1


def test_hook_puts_the_real_token_on_an_allowed_request_and_streams(addon) -> None:  # type: ignore[no-untyped-def]
    flow = _flow("api.anthropic.com", "POST", "/v1/messages",
                 ((b"authorization", f"Bearer {ANTHROPIC_PLACEHOLDER}".encode()),
                  (b"x-api-key", ANTHROPIC_PLACEHOLDER.encode())))
    addon.requestheaders(flow)
    assert flow.response is None and flow.request.stream is True
    assert flow.request.headers.get_all("authorization") == ["Bearer sk-ant-oat01-REAL"]
    assert "x-api-key" not in flow.request.headers
    from mitmproxy.test import tutils

    flow.response = tutils.tresp()
    addon.responseheaders(flow)
    assert flow.response.stream is True


def test_hook_sends_to_the_host_decided_on_not_the_address(addon) -> None:  # type: ignore[no-untyped-def]
    flow = _flow("example.com")
    flow.request.data.host = "203.0.113.9"  # what transparent mode starts with
    addon.requestheaders(flow)
    assert flow.response is None and flow.request.host == "example.com"
    assert flow.request.headers["host"] == "example.com"


def test_hook_refuses_sni_and_host_that_differ(addon) -> None:  # type: ignore[no-untyped-def]
    flow = _flow("example.com")
    flow.client_conn.sni = "api.anthropic.com"
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403


def test_hook_defers_graphql_to_the_body(addon) -> None:  # type: ignore[no-untyped-def]
    flow = _flow("api.github.com", "POST", "/graphql", content=b'{"query": "mutation {}"}')
    addon.requestheaders(flow)
    assert flow.response is None and flow.request.stream is False  # waits for the body
    addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 403  # not allowlisted


def test_hook_refuses_everything_without_a_valid_policy(addon) -> None:  # type: ignore[no-untyped-def]
    (addon.base / "policy.json").write_text("{}")
    flow = _flow("example.com")
    addon.requestheaders(flow)
    assert flow.response is not None and "no valid policy" in flow.response.text


# --- the boot side's pure parts -------------------------------------------------------------------


def test_policy_renders_rules_and_grant_expiry() -> None:
    allow = Allowlist((parse_entry("api.github.com preset=github", "domains.conf", 7),
                       parse_entry("example.com", GRANT_SOURCE, 0),
                       parse_entry("@github", "domains.conf", 9)))
    policy = setup.render_policy(allow, {"example.com": 1234.5}, ["Owner/Repo"], ["R_kgDOAbc"],
                                 ["192.0.2.0/24"])
    back = ProxyPolicy.from_json(policy.to_json())
    gh, granted, ranges = back.entries
    assert (gh.where, gh.rules, gh.expires) == ("domains.conf:7", Rules(preset="github"), None)
    assert (granted.where, granted.rules, granted.expires) == ("codetainer allow:0", None, 1234.5)
    assert ranges.kind == "github"
    assert back.github_repos == ("owner/repo",) and back.github_repo_ids == ("R_kgDOAbc",)
    assert back.github_ranges == ("192.0.2.0/24",)


def test_exec_script_runs_mitmdump_as_the_proxy_user_with_the_addon(tmp_path: Path) -> None:
    text = setup.exec_script(tmp_path, 998, 998, ["127.0.0.1", "::1"], mitmdump="/v/bin/mitmdump")
    assert text.startswith("#!/bin/sh\n")
    line = text.splitlines()[-1]
    assert "setpriv --reuid=998 --regid=998 --clear-groups" in line and "env -i" in line
    for mode in ("regular@127.0.0.1:3128", "transparent@127.0.0.1:3129", "regular@::1:3128",
                 "transparent@::1:3129"):
        assert f"--mode {mode}" in line
    addon = line.split(" -s ", 1)[1].split()[0]
    assert addon.endswith("proxy/addon.py") and os.path.isfile(addon)
    assert f"ssl_verify_upstream_trusted_ca={tmp_path}/upstream-ca.pem" in line
    assert "connection_strategy=lazy" in line and "GH_PAT" not in line


def test_bundles_drop_old_proxy_cas_and_duplicates() -> None:
    a = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
    b = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----"
    old = "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----"
    system = setup.pem_certificates(f"# comment\n{a}\n{old}\n{a}\n")
    assert system == [a, old, a]
    assert setup.bundle(system, [b], drop=[old.replace("\n", "\r\n")]) == f"{a}\n{b}\n"


def test_listening_reads_the_kernel_table(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st\n"
    (tmp_path / "tcp").write_text(header + "   0: 0100007F:0C39 00000000:0000 0A\n"
                                  "   1: 0100007F:0C38 0100007F:E738 01\n")
    (tmp_path / "tcp6").write_text(header + "   0: 00000000000000000000000001000000:0C39 "
                                   "00000000000000000000000000000000:0000 0A\n")
    assert setup.listening("127.0.0.1", 3129, tmp_path)
    assert not setup.listening("127.0.0.1", 3128, tmp_path)  # established, not listening
    assert setup.listening("::1", 3129, tmp_path)
    assert not setup.listening("::1", 3128, tmp_path)


def test_proxy_setting_is_on_or_off() -> None:
    from codetainer.settings import Settings

    assert setup.proxy_enabled(Settings())
    assert not setup.proxy_enabled(Settings(proxy="OFF"))
    with pytest.raises(ValueError, match="CODETAINER_PROXY='yes'"):
        setup.proxy_enabled(Settings(proxy="yes"))


def test_time_is_wall_clock_in_records(tmp_path: Path) -> None:
    log = RefusedLog(tmp_path / "r.json")
    rec = log.record("h", "GET", "/", where="", rule="r", reason="x", now=time.time())
    assert abs(rec.last - time.time()) < 5


# --- the repository lookup (a GitHub API stand-in on loopback) ------------------------------------


@pytest.fixture
def github_api():  # type: ignore[no-untyped-def]
    import http.server
    import threading

    seen: list[tuple[str, str | None]] = []
    replies: dict[str, tuple[int, object]] = {}

    class Api(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            status, obj = replies.get(self.path, (404, {"message": "Not Found"}))
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", replies, seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def _controller(tmp_path: Path, api: str):  # type: ignore[no-untyped-def]
    from codetainer.events import EventBus
    from codetainer.network.controller import NetworkController
    from codetainer.services.manager import ServiceManager
    from codetainer.settings import Settings

    settings = Settings(run_dir=str(tmp_path), github_api_url=api, github_api_timeout="2")
    events = EventBus()
    services = ServiceManager(tmp_path / "services.conf", events)
    ctl = setup.ProxyController(settings, events, services, NetworkController(settings, events, services))
    (tmp_path / "proxy").mkdir()
    ctl.render(strict=True)
    return ctl


def test_lookup_gives_the_policy_the_fork_and_its_upstream(tmp_path: Path, github_api) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    api, replies, seen = github_api
    replies["/repos/me/fork"] = (200, {"full_name": "me/fork", "node_id": "R_kgDOfork", "fork": True,
                                       "parent": {"full_name": "Up/Stream", "node_id": "R_kgDOup"}})
    ctl = _controller(tmp_path, api)
    note = asyncio.run(ctl._repos("me/fork", "ghp_tok"))
    assert note == "GitHub writes to me/fork, up/stream (2 node IDs)"
    policy = ProxyPolicy.from_json((tmp_path / "proxy" / "policy.json").read_text())
    assert policy.github_repos == ("me/fork", "up/stream")
    assert policy.github_repo_ids == ("R_kgDOfork", "R_kgDOup")
    assert seen == [("/repos/me/fork", "Bearer ghp_tok")]
    assert ctl.policy() == policy


def test_a_failed_lookup_says_so_and_retries_in_the_background(tmp_path: Path, github_api) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    api, replies, _ = github_api
    replies["/repos/me/repo"] = (500, {"message": "ghp_tok is broken"})
    ctl = _controller(tmp_path, api)

    async def run() -> str:
        note = await ctl._repos("me/repo", "ghp_tok")
        assert ctl._retry is not None and not ctl._retry.done()
        await ctl.close()
        return note

    note = asyncio.run(run())
    assert "node ID unknown yet" in note and "retrying" in note and "ghp_tok" not in note
    policy = ProxyPolicy.from_json((tmp_path / "proxy" / "policy.json").read_text())
    assert policy.github_repo_ids == ()


def test_status_reads_refusals_and_says_when_the_proxy_is_down(tmp_path: Path) -> None:
    ctl = _controller(tmp_path, "http://127.0.0.1:9")
    assert ctl.status() == {"state": "absent", "ports": [3128, 3129], "requests": 0,
                            "refused_total": 0, "refused": []}
    log = RefusedLog(tmp_path / "proxy" / "state" / "refused.json")
    (tmp_path / "proxy" / "state").mkdir()
    for i in range(12):
        log.seen()
        log.record(f"h{i}.example", "GET", "/", where="", rule="r", reason="x", now=float(i))
    log.write(0.0)
    ctl.started = True  # after the step: a proxy that is not RUNNING degrades the machine
    st = ctl.status()
    assert [r["host"] for r in st["refused"]] == [f"h{i}.example" for i in range(11, 1, -1)]
    assert (st["requests"], st["refused_total"]) == (12, 12)
    assert "absent" in st["degraded"]
