"""The policy proxy's boot side, in a full boot: the ``proxy`` step, its files, the
running proxy, and status.

codetainerd boots as PID 1 in the test world with ``CODETAINER_PROXY=on``, the
stand-ins of codetainer/sandbox/standins.py under their real names (their test CA named in
``CODETAINER_PROXY_UPSTREAM_CA``) and a writable ``/usr/local/share/ca-certificates``
(the scratch root's ``/usr`` is the host's, read-only; the image's is writable until the
root goes read-only), so the step's ``update-ca-certificates`` runs for real. Requests
are made as uid 1000 through the explicit proxy (the firewall's redirect and the agent's
environment are other steps' work): one reaches the stand-in with the real token put on
by the proxy, others are refused with a 403 and show up in ``status``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from codetainer.cli.render import render_why
from codetainer.control.client import RequestFailed
from codetainer.proxy.model import ANTHROPIC_PLACEHOLDER, GITHUB_PLACEHOLDER, PROXY_PORT
from codetainer.sandbox.daemonproc import wait_for
from codetainer.sandbox.fullboot import FullBoot, default_names, full_boot, publish_names
from codetainer.sandbox.standins import StandIns
from codetainer.sandbox.world import World

pytestmark = pytest.mark.integration

PROXY_DIR = "/run/codetainer/proxy"
AS_AGENT = ("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--")
GH_PAT = "ghp_PROXYBOOTreal0123456789abcdef"
OAUTH = "sk-ant-oat01-PROXYBOOTreal0123456789"
#: sentry.io for reads only (domains.conf no longer lists it)
ALLOW = "sentry.io:443 methods=GET;"


class Machine:
    def __init__(self, fb: FullBoot, standins: StandIns, boot: dict[str, Any]) -> None:
        self.fb, self.standins, self.boot = fb, standins, boot

    def curl(self, url: str, *args: str, cacert: str | None = f"{PROXY_DIR}/ca.pem"
             ) -> tuple[int, dict[str, str], str]:
        """As the agent's uid, through the explicit proxy: (status, headers, body). A
        CONNECT the proxy refused gives its status and no headers."""
        argv = [*AS_AGENT, "curl", "-sS", "--max-time", "20", "--proxy",
                f"http://127.0.0.1:{PROXY_PORT}", *(["--cacert", cacert] if cacert else []),
                "-i", "--suppress-connect-headers", "-w", "\n%{http_connect}", *args, url]
        r = self.fb.inside(*argv)
        out, _, connect = r.stdout.rpartition("\n")
        if r.returncode == 56 and connect != "200":  # the proxy refused the tunnel
            return int(connect), {}, ""
        assert r.returncode == 0, f"curl {url}: exit {r.returncode}: {r.stderr[-800:]}"
        head, _, body = out.replace("\r\n", "\n").partition("\n\n")
        status_line, *lines = head.splitlines()
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        return int(status_line.split()[1]), headers, body

    def proxy_status(self) -> dict[str, Any]:
        section: dict[str, Any] = self.fb.status()["proxy"]
        return section


@pytest.fixture(scope="module")
def m() -> Iterator[Machine]:
    base = Path(tempfile.mkdtemp(prefix="ct-proxyboot-", dir="/tmp"))
    base.chmod(0o755)
    cacerts = base / "local-ca-certificates"
    cacerts.mkdir()
    try:
        with World(ttl=60) as world:
            publish_names(world, default_names())
            standins = StandIns(world, base, github_token=GH_PAT, oauth_token=OAUTH,
                                placeholders=(GITHUB_PLACEHOLDER, ANTHROPIC_PLACEHOLDER))
            fb = FullBoot(world, base, env={
                "CODETAINER_PROXY": "on", **standins.env(), "GH_PAT": GH_PAT,
                "CLAUDE_CODE_OAUTH_TOKEN": OAUTH, "CODETAINER_ALLOW": ALLOW},
                binds=((str(cacerts), "/usr/local/share/ca-certificates", False),))
            try:
                st = fb.wait_boot(timeout=120)
                yield Machine(fb, standins, st)
            finally:
                fb.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_boot_is_ready_with_the_proxy_running(m: Machine) -> None:
    assert m.boot["state"] == "READY", (m.boot["reasons"], m.fb.log()[-4000:])
    steps = [s["name"] for s in m.boot["steps"]]
    assert steps.index("network-selftest") < steps.index("proxy") < steps.index("credentials")
    step = next(s for s in m.boot["steps"] if s["name"] == "proxy")
    assert step["state"] == "OK", step
    assert "CA in the system store" in step["reason"], step["reason"]
    svc = next(s for s in m.fb.status()["services"] if s["name"] == "proxy")
    assert svc["state"] == "RUNNING", svc
    section = m.proxy_status()
    assert section["state"] == "RUNNING" and section["ports"] == [3128, 3129]
    assert "degraded" not in section


def test_the_proxy_runs_as_its_user_undumpable(m: Machine) -> None:
    pid = next(s for s in m.fb.status()["services"] if s["name"] == "proxy")["pid"]
    r = m.fb.inside("sh", "-c", f"grep -E '^(Uid|Gid):' /proc/{pid}/status; "
                    f"stat -c '%u' /proc/{pid}/environ; tr '\\0' ' ' < /proc/{pid}/cmdline")
    uid_line, gid_line, environ_owner, cmdline = r.stdout.splitlines()
    assert uid_line.split()[1:] == ["998"] * 4 and gid_line.split()[1:] == ["998"] * 4
    assert environ_owner == "0"  # non-dumpable: /proc/<pid>/ belongs to root
    assert "mitmdump" in cmdline and "addon.py" in cmdline
    events = [e for e in m.fb.events() if "proxy_loaded" in str(e.get("line", ""))]
    assert events and json.loads(events[0]["line"])["undumpable"] is True


def test_files_have_the_modes_and_owners_of_the_design(m: Machine) -> None:
    r = m.fb.inside("sh", "-c", f"cd {PROXY_DIR} && stat -c '%n %a %U' . policy.json ca.pem "
                    "ca-bundle.pem upstream-ca.pem exec conf conf/mitmproxy-ca.pem "
                    "conf/credentials.json state")
    assert r.returncode == 0, r.stderr
    modes = {n: (mode, user) for n, mode, user in (ln.split() for ln in r.stdout.splitlines())}
    assert modes == {
        ".": ("755", "root"), "policy.json": ("644", "root"), "ca.pem": ("644", "root"),
        "ca-bundle.pem": ("644", "root"), "upstream-ca.pem": ("644", "root"),
        "exec": ("755", "root"), "conf": ("700", "codetainer-proxy"),
        "conf/mitmproxy-ca.pem": ("400", "codetainer-proxy"),
        "conf/credentials.json": ("400", "codetainer-proxy"), "state": ("755", "codetainer-proxy"),
    }
    # the agent reads the CA certificate, never its key or the credentials
    ok = m.fb.inside(*AS_AGENT, "cat", f"{PROXY_DIR}/ca.pem")
    assert ok.returncode == 0 and "BEGIN CERTIFICATE" in ok.stdout
    for secret in ("conf/mitmproxy-ca.pem", "conf/credentials.json"):
        r = m.fb.inside(*AS_AGENT, "cat", f"{PROXY_DIR}/{secret}")
        assert r.returncode != 0 and "Permission denied" in r.stderr, secret
    # the CA: a CA, P-256, in the system store and in the agent's bundle
    r = m.fb.inside("openssl", "x509", "-in", f"{PROXY_DIR}/ca.pem", "-noout", "-text")
    assert "CA:TRUE" in r.stdout and "P-256" in r.stdout and "Certificate Sign" in r.stdout
    ca = m.fb.inside("cat", f"{PROXY_DIR}/ca.pem").stdout.strip()
    for bundle in ("/etc/ssl/certs/ca-certificates.crt", f"{PROXY_DIR}/ca-bundle.pem"):
        assert ca in m.fb.inside("cat", bundle).stdout, bundle
    assert ca not in m.fb.inside("cat", f"{PROXY_DIR}/upstream-ca.pem").stdout


def test_an_allowed_request_reaches_the_service_with_the_real_token(m: Machine) -> None:
    before = len(m.standins.api_requests())
    status, headers, body = m.curl("https://api.anthropic.com/v1/models", "-H",
                                   f"Authorization: Bearer {ANTHROPIC_PLACEHOLDER}")
    assert "x-codetainer-refused" not in headers, body
    assert status == 404 and "not_found_error" in body  # the stand-in's own answer
    seen = m.standins.api_requests()[before:]
    assert [(r["method"], r["path"], r["auth"], r["token"]) for r in seen] == \
        [("GET", "/v1/models", "bearer", "real")]
    # the system store trusts the proxy too (no --cacert)
    status, headers, _ = m.curl("https://sentry.io/", cacert=None)
    assert status == 200 and "x-codetainer-refused" not in headers


def test_refused_requests_get_403_and_show_in_status(m: Machine) -> None:
    before = len(m.standins.requests(method="POST")), len(m.standins.api_requests())
    status, headers, body = m.curl("https://sentry.io/api/1/store/?sentry_key=k", "-X", "POST",
                                   "--data", "{}")
    assert status == 403 and headers["x-codetainer-refused"] == "CODETAINER_ALLOW:1", body
    assert body.startswith("codetainer: refused by CODETAINER_ALLOW:1 methods=GET: ")
    status, headers, body = m.curl("https://api.anthropic.com/admin", "-X", "POST", "--data", "{}")
    assert status == 403 and "domains.conf:" in headers["x-codetainer-refused"], body
    assert "preset=anthropic" in body
    # neither reached a stand-in
    assert (len(m.standins.requests(method="POST")), len(m.standins.api_requests())) == before

    def listed() -> list[dict[str, Any]] | None:
        rows = m.proxy_status()["refused"]
        keys = {(r["host"], r["method"], r["path"]) for r in rows}
        want = {("sentry.io", "POST", "/api/1/store/"), ("api.anthropic.com", "POST", "/admin")}
        return rows if want <= keys else None

    rows = wait_for(listed, 10, "the refusals in status")
    sentry = next(r for r in rows if r["host"] == "sentry.io")
    assert sentry["rule"] == "methods=GET" and sentry["count"] == 1 and sentry["last"] > 0
    section = m.proxy_status()
    assert section["requests"] >= 2 and section["refused_total"] >= 2
    assert "sentry_key" not in json.dumps(section)  # queries are never recorded


def test_a_grant_reaches_the_proxys_policy(m: Machine) -> None:
    url = "https://o1.ingest.sentry.io/"
    assert m.curl(url)[0] == 403  # not allowlisted: the proxy refuses the CONNECT
    result = m.fb.call("allow", target="o1.ingest.sentry.io", duration="10m")
    assert result["ok"], result
    policy = json.loads(m.fb.inside("cat", f"{PROXY_DIR}/policy.json").stdout)
    granted = [e for e in policy["entries"] if e["value"] == "o1.ingest.sentry.io"]
    assert granted and granted[0]["expires"] > 0 and granted[0]["where"] == "codetainer allow:0"

    def passes() -> bool:  # the proxy looks at policy.json at most every 0.5 s
        return m.curl(url)[0] == 200

    wait_for(passes, 10, "the granted name to pass the proxy", interval=0.2)


def test_why_url_names_the_rule_that_decides_each_method(m: Machine) -> None:
    report = m.fb.call("why", target="https://api.github.com/gists")
    by_method = {q["method"]: q for q in report["requests"]}
    assert by_method["GET"]["allowed"] is True, render_why(report)
    post = by_method["POST"]
    assert post["allowed"] is False and "domains.conf:" in post["where"], render_why(report)
    assert "preset=github" in post["rule"] and "/gists" in post["reason"], post
    assert "proxy: POST https://api.github.com/gists: REFUSED" in render_why(report)
    one = m.fb.call("why", target="https://registry.npmjs.org/ct-tiny", method="PUT")
    assert [q["method"] for q in one["requests"]] == ["PUT"]
    assert one["requests"][0]["allowed"] is False, render_why(one)
    # refusals the proxy recorded for the host are shown beside the verdicts
    assert m.curl("https://sentry.io/y", "-X", "POST", "--data", "{}")[0] == 403

    def recorded() -> dict[str, Any] | None:
        rep: dict[str, Any] = m.fb.call("why", target="https://sentry.io/y")
        return rep if any(r["path"] == "/y" for r in rep["proxy_refused"]) else None

    wait_for(recorded, 10, "sentry.io's refusal in why", interval=0.2)
    with pytest.raises(RequestFailed, match="http:// or https://"):
        m.fb.call("why", target="ftp://sentry.io/")


def test_while_the_proxy_is_down_the_agents_https_fails_closed(m: Machine) -> None:
    """Stopped by the operator: the agent's HTTPS to an allowlisted address, proxy
    variables or not, is refused at once (redirected to a closed port), never direct."""
    from codetainer.sandbox.standins import GITHUB_ADDR

    seen = len(m.standins.requests())
    m.fb.call("stop", name="proxy")
    try:
        assert m.fb.status()["state"] == "DEGRADED"
        assert "policy proxy" in (m.proxy_status().get("degraded") or "")
        for via in (["--proxy", f"http://127.0.0.1:{PROXY_PORT}"], ["--noproxy", "*"]):
            r = m.fb.inside(*AS_AGENT, "curl", "-sS", "--max-time", "10", *via, "--cacert",
                            f"{PROXY_DIR}/ca.pem", "https://api.github.com/zen")
            assert r.returncode == 7, (via, r.returncode, r.stderr)  # couldn't connect
        r = m.fb.inside(*AS_AGENT, "curl", "-sS", "--max-time", "10", "-k",
                        "--resolve", f"api.github.com:443:{GITHUB_ADDR}",
                        "https://api.github.com/zen")
        assert r.returncode == 7, (r.returncode, r.stderr)
        assert len(m.standins.requests()) == seen  # nothing reached the service
    finally:
        m.fb.call("start", name="proxy")
    wait_for(lambda: m.fb.status()["state"] == "READY", 30, "READY again")


def test_a_proxy_that_dies_is_restarted_with_the_same_policy(m: Machine) -> None:
    """(Last: it replaces the process the tests above looked at.)"""
    def proxy() -> dict[str, Any]:
        svc: dict[str, Any] = next(s for s in m.fb.status()["services"] if s["name"] == "proxy")
        return svc

    old = proxy()["pid"]
    r = m.fb.inside("kill", "-KILL", str(old))
    assert r.returncode == 0, r.stderr

    def back() -> dict[str, Any] | None:
        svc = proxy()
        return svc if svc["state"] == "RUNNING" and svc["pid"] not in (old, None) else None

    wait_for(back, 30, "the proxy to be restarted", interval=0.1)
    assert "degraded" not in m.proxy_status()
    status, headers, _ = m.curl("https://sentry.io/")
    assert status == 200 and "x-codetainer-refused" not in headers
    status, headers, _ = m.curl("https://sentry.io/x", "-X", "POST", "--data", "{}")
    assert status == 403 and headers["x-codetainer-refused"] == "CODETAINER_ALLOW:1"


def test_a_rule_that_does_not_parse_fails_the_boot_closed() -> None:
    """A bad rule part is a bad allowlist line: FAILED with file:line, no proxy, no agent."""
    env = {"CODETAINER_PROXY": "on", "CODETAINER_ALLOW": "example.com:443 verbs=POST;"}
    with full_boot(env=env) as fb:
        st = fb.wait_boot(timeout=60)
        assert st["state"] == "FAILED", st
        reasons = " ".join(st["reasons"])
        assert "CODETAINER_ALLOW:1" in reasons and "verbs" in reasons, reasons
        steps = {s["name"]: s["state"] for s in st["steps"]}
        assert steps.get("proxy") in (None, "PENDING", "SKIPPED"), steps
        assert not any(s["name"] == "proxy" and s.get("pid") for s in st["services"])
        assert st.get("session") in (None, {}) or st["session"].get("state") != "RUNNING"

