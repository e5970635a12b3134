"""Stand-ins for GitHub, the npm registry, PyPI, sentry.io and Anthropic's API, in the test world.

The policy proxy is proven against these the way the agent's tools meet the real
services: under the real host names (published in the world's DNS), on port 443, with
certificates from a test CA (``make_ca`` of apistandin.py) that the proxy is told to
trust (``CODETAINER_PROXY_UPSTREAM_CA``) and that the machine's system store holds, as a
public CA is held by a real one. Each service answers what its real client needs, and
nothing more:

* GitHub (``github.com``, ``api.github.com``, ``uploads.github.com``,
  ``codeload.github.com`` on ``GITHUB_ADDR``): git smart HTTP through the real
  ``git http-backend`` (CGI) for ``owner/repo`` (private: fetch and push need
  ``Basic x-access-token:<the real GH_PAT>``) and ``attacker/repo`` (public fetch; push
  with the attacker's token, as the real GitHub would take it); REST ``GET /user``,
  ``GET /repos/{o}/{r}`` (with ``node_id``), ``GET /repos/{o}/{r}/readme``,
  ``POST /repos/{o}/{r}/issues/{n}/comments``, ``POST /gists``, ``GET /gists/{id}``, and
  ``POST /graphql`` (``repository(owner, name)`` and ``viewer``: what ``gh repo view``
  and ``gh auth status`` ask). Writes with the attacker's token to the attacker's
  resources succeed here, so a refusal is the proxy's doing, never the stand-in's.
* npm (``registry.npmjs.org`` on ``NPM_ADDR``): the package document and tarball of
  ``ct-tiny`` (built at test time), and ``PUT`` (publish) accepted.
* PyPI (``pypi.org``, ``files.pythonhosted.org`` on ``PYPI_ADDR``): ``/simple/ct-tiny/``
  (PEP 503 HTML) and a minimal wheel built at test time.
* sentry.io (``sentry.io``, ``o1.ingest.sentry.io`` on ``SENTRY_ADDR``): takes any event.
* Anthropic (``api.anthropic.com`` on ``API_HOST``): apistandin.py's handler, its
  records extended with which token the request carried.
* Port 80 of the stand-ins' own addresses serves the same over plain HTTP.
* Any other ``Host`` on these addresses (a CDN serves many sites from one address) gets
  ``200 other site: HOST``.

Every request is recorded, one JSON line each, in ``requests.jsonl``: the service, the
TLS server name, ``Host``, method, path, the ``Authorization`` header's kind (``basic``,
``bearer``, ``token``) and which credential it held (``real``, ``placeholder``,
``attacker``, ``other``): never a token. The server process reads its configuration
(the tokens among it) on stdin, so no token is on a command line.

Run as ``python3 standins.py`` in the world's namespace (the :class:`StandIns` class does
this); it prints ``listening`` once every address accepts.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

GITHUB_ADDR = "203.0.113.60"
NPM_ADDR = "203.0.113.61"
PYPI_ADDR = "203.0.113.62"
SENTRY_ADDR = "203.0.113.63"
API_ADDR = "203.0.113.50"  # world.py API_HOST: on the world's loopback already
OWN_ADDRS = (GITHUB_ADDR, NPM_ADDR, PYPI_ADDR, SENTRY_ADDR)

GITHUB_NAMES = ("github.com", "api.github.com", "uploads.github.com", "codeload.github.com")
NPM_NAMES = ("registry.npmjs.org",)
PYPI_NAMES = ("pypi.org", "files.pythonhosted.org")
SENTRY_NAMES = ("sentry.io", "o1.ingest.sentry.io")
API_NAMES = ("api.anthropic.com",)
SITES = {GITHUB_ADDR: GITHUB_NAMES, NPM_ADDR: NPM_NAMES, PYPI_ADDR: PYPI_NAMES,
         SENTRY_ADDR: SENTRY_NAMES, API_ADDR: API_NAMES}
ALL_NAMES = tuple(n for names in SITES.values() for n in names)

#: the repository of REPO_URL (private), and one of the attacker's (public)
OWNER_REPO = "owner/repo"
ATTACKER_REPO = "attacker/repo"
REPOS = {OWNER_REPO: True, ATTACKER_REPO: False}  # slug -> private
#: the token a prompt injection hands the agent (GitHub's and npm's): the stand-in
#: takes it for the attacker's own resources, as the real services would
ATTACKER_TOKEN = "ghp_ATTACKERpastedThisToken0000000000000"
NPM_ATTACKER_TOKEN = "npm_ATTACKERpastedThisToken00000000000000"

PACKAGE = "ct-tiny"
PACKAGE_VERSION = "1.0.0"
WHEEL_VERSION = "1.0"
WHEEL = f"ct_tiny-{WHEEL_VERSION}-py3-none-any.whl"
WHEEL_PATH = f"/packages/c7/1a/{WHEEL}"
MODULE_VALUE = "from-the-pypi-stand-in"
NODE_VALUE = "from-the-npm-stand-in"
README = "hello from owner/repo\n"
NODE_ID = "R_kgDOCodetainerOwnerRepo"


# -- building the served artefacts (test side) ---------------------------------------------------


def build_npm_tarball(directory: Path) -> dict[str, Any]:
    """``ct-tiny-1.0.0.tgz`` (what ``npm pack`` makes: ``package/`` inside) and its packument."""
    manifest = {"name": PACKAGE, "version": PACKAGE_VERSION, "main": "index.js",
                "description": "a tiny package of the test world", "license": "MIT"}
    files = {"package/package.json": json.dumps(manifest, indent=2).encode(),
             "package/index.js": f"module.exports = {json.dumps(NODE_VALUE)};\n".encode()}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    tgz = gzip.compress(raw.getvalue(), mtime=0)
    name = f"{PACKAGE}-{PACKAGE_VERSION}.tgz"
    (directory / name).write_bytes(tgz)
    dist = {"tarball": f"https://registry.npmjs.org/{PACKAGE}/-/{name}",
            "shasum": hashlib.sha1(tgz).hexdigest(),  # npm's own field
            "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()}
    packument = {"_id": PACKAGE, "name": PACKAGE, "dist-tags": {"latest": PACKAGE_VERSION},
                 "versions": {PACKAGE_VERSION: {**manifest, "_id": f"{PACKAGE}@{PACKAGE_VERSION}",
                                                "dist": dist}},
                 "time": {"created": "2024-01-01T00:00:00.000Z",
                          "modified": "2024-01-01T00:00:00.000Z",
                          PACKAGE_VERSION: "2024-01-01T00:00:00.000Z"}}
    (directory / "packument.json").write_text(json.dumps(packument))
    return packument


def build_wheel(directory: Path) -> str:
    """A minimal pure-Python wheel (zipfile, by hand); returns its sha256."""
    dist = f"ct_tiny-{WHEEL_VERSION}.dist-info"
    files = {
        "ct_tiny/__init__.py": f"VALUE = {MODULE_VALUE!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: ct-tiny\nVersion: {WHEEL_VERSION}\n"
                            "Summary: a tiny package of the test world\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: codetainer-tests\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = directory / WHEEL
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_repos(root: Path) -> None:
    """Bare repositories ``owner/repo.git`` and ``attacker/repo.git``, one commit on main,
    pushes enabled (the stand-in decides who may push, before git sees the request)."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    src = root.parent / "git-src"
    subprocess.run([*git, "init", "-q", str(src)], check=True)
    (src / "README.md").write_text(README)
    subprocess.run([*git, "-C", str(src), "add", "."], check=True)
    subprocess.run([*git, "-C", str(src), "commit", "-qm", "initial commit"], check=True)
    for slug in REPOS:
        bare = root / f"{slug}.git"
        subprocess.run([*git, "clone", "-q", "--bare", str(src), str(bare)], check=True)
        subprocess.run(["git", "-C", str(bare), "config", "http.receivepack", "true"], check=True)


# -- the server (world side; stdlib only) ----------------------------------------------------------

_LOCK = threading.Lock()
_GIT = re.compile(r"/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?"
                  r"(/(?:info/refs|git-upload-pack|git-receive-pack|HEAD))\Z")


def credential(header: str | None) -> tuple[str | None, str | None, str | None]:
    """(kind, user, secret) of an Authorization header."""
    if not header:
        return None, None, None
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            user, _, secret = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return "basic", None, None
        return "basic", user, secret
    if scheme in ("bearer", "token"):
        return scheme, None, value.strip()
    return "other", None, value


class Site(BaseHTTPRequestHandler):
    """One request to a stand-in; routed by the Host header (as a CDN would)."""

    protocol_version = "HTTP/1.1"
    server_version = "standin"
    cfg: dict[str, Any] = {}

    def log_message(self, *args: Any) -> None:
        pass

    # -- plumbing ---------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    @classmethod
    def token_kind(cls, secret: str | None) -> str | None:
        """Which credential ``secret`` is: real, placeholder, attacker, other."""
        if secret is None:
            return None
        c = cls.cfg
        if secret in (c["github_token"], c["oauth_token"]):
            return "real"
        if secret in c["placeholders"]:
            return "placeholder"
        if secret in (ATTACKER_TOKEN, NPM_ATTACKER_TOKEN):
            return "attacker"
        return "other"

    def handle_one_request(self) -> None:
        self._status = 0
        self._note: dict[str, Any] = {}
        super().handle_one_request()

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def reply(self, status: int, body: bytes | str | Any = b"", ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def record(self, body: bytes) -> None:
        kind, user, secret = credential(self.headers.get("Authorization"))
        note: dict[str, Any] = {}
        if body and (self.headers.get("Content-Type") or "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
                note["json_keys"] = sorted(parsed) if isinstance(parsed, dict) else None
        entry = {"t": time.time(), "site": self.server.site,  # type: ignore[attr-defined]
                 "port": self.server.server_address[1],  # type: ignore[index]
                 "sni": getattr(self.connection, "ct_sni", None),
                 "host": (self.headers.get("Host") or "").split(":")[0].lower(),
                 "method": self.command, "path": self.path, "auth": kind, "user": user,
                 "token": self.token_kind(secret), "status": self._status,
                 "ua": self.headers.get("User-Agent"), "bytes": len(body), **note,
                 **self._note}
        with _LOCK, open(self.cfg["log"], "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def route(self) -> None:
        body = self._body()
        try:
            host = (self.headers.get("Host") or "").split(":")[0].lower()
            if host == "api.github.com":
                self.github_api(body)
            elif host in GITHUB_NAMES:
                self.github_web(body)
            elif host == "registry.npmjs.org":
                self.npm(body)
            elif host in PYPI_NAMES:
                self.pypi()
            elif host in SENTRY_NAMES:
                self.reply(200, {"id": uuid.uuid4().hex})
            else:
                self.reply(200, f"other site: {host}\n", "text/plain")
        finally:
            self.record(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_PATCH = do_DELETE = route

    # -- GitHub -----------------------------------------------------------------------------------

    def _secret(self) -> tuple[str | None, str | None]:
        kind, _user, secret = credential(self.headers.get("Authorization"))
        return kind, self.token_kind(secret)

    def github_web(self, body: bytes) -> None:
        path, _, query = self.path.partition("?")
        m = _GIT.match(path)
        if m is None:
            self.reply(200 if path == "/" else 404, "github stand-in\n", "text/html")
            return
        slug = f"{m.group(1)}/{m.group(2)}".lower()
        if slug not in REPOS:
            self.reply(404, "Repository not found.\n", "text/plain")
            return
        push = "git-receive-pack" in path or "service=git-receive-pack" in query
        kind, token = self._secret()
        self._note = {"repo": slug, "push": push}
        if REPOS[slug] or push:
            # the real token opens the configured repository; the attacker's own token
            # pushes to the attacker's repository; anything else is told to authenticate
            want = "real" if slug == OWNER_REPO else "attacker"
            if kind is None:
                self.reply(401, "authentication required\n", "text/plain",
                           {"WWW-Authenticate": 'Basic realm="GitHub"'})
                return
            if kind != "basic" or token != want:
                self.reply(403 if token in ("real", "attacker") else 401,
                           "Permission denied\n", "text/plain",
                           {"WWW-Authenticate": 'Basic realm="GitHub"'})
                return
        self.git_cgi(f"/{slug}.git{m.group(3)}", query, body)

    def git_cgi(self, path: str, query: str, body: bytes) -> None:
        env = {"PATH": "/usr/bin:/bin", "GIT_PROJECT_ROOT": self.cfg["git_root"],
               "GIT_HTTP_EXPORT_ALL": "1", "GIT_CONFIG_NOSYSTEM": "1",
               "HOME": self.cfg["git_root"], "PATH_INFO": path,
               "REQUEST_METHOD": self.command, "QUERY_STRING": query,
               "CONTENT_TYPE": self.headers.get("Content-Type") or "",
               "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": self.client_address[0],
               "REMOTE_USER": "x-access-token"}
        for header, var in (("Git-Protocol", "HTTP_GIT_PROTOCOL"),
                            ("Content-Encoding", "HTTP_CONTENT_ENCODING")):
            if self.headers.get(header):
                env[var] = self.headers[header]
        proc = subprocess.run(["git", "http-backend"], input=body, env=env,
                              capture_output=True, timeout=120, check=False)
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = proc.stdout.partition(b"\n\n")
        status, headers = 200, {}
        for line in head.decode(errors="replace").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers[k.strip()] = v.strip()
        ctype = headers.pop("Content-Type", "application/octet-stream")
        headers.pop("Content-Length", None)
        self.reply(status, payload, ctype, headers)

    def github_api(self, body: bytes) -> None:
        path = self.path.split("?")[0].rstrip("/") or "/"
        kind, token = self._secret()
        scopes = {"X-OAuth-Scopes": "repo, gist, read:org, workflow",
                  "X-GitHub-Media-Type": "github.v3; format=json"}

        def ok(status: int, obj: Any) -> None:
            self.reply(status, obj, "application/json; charset=utf-8", scopes)

        def no(status: int, message: str) -> None:
            self.reply(status, {"message": message, "documentation_url": "https://docs.github.com"},
                       "application/json; charset=utf-8")

        m = re.fullmatch(r"/repos/([^/]+)/([^/]+)(/.*)?", path)
        slug = f"{m.group(1)}/{m.group(2)}".lower() if m else None
        rest = (m.group(3) or "") if m else ""
        if slug:
            self._note = {"repo": slug}
        # the real token sees the configured (private) repository; anyone sees the
        # attacker's (public) one
        visible = slug in REPOS and (not REPOS[slug] or token == "real")
        if path == "/user" and self.command == "GET":
            if token in ("real", "attacker"):
                ok(200, {"login": "owner" if token == "real" else "attacker", "id": 1,
                         "node_id": "U_kgDOowner", "type": "User", "name": "The Owner"})
            else:
                no(401, "Bad credentials" if kind else "Requires authentication")
        elif path == "/gists" and self.command == "POST":
            if token in ("real", "attacker"):
                gid = uuid.uuid4().hex
                ok(201, {"id": gid, "html_url": f"https://gist.github.com/{gid}", "public": False,
                         "files": {}})
            else:
                no(401, "Requires authentication")
        elif re.fullmatch(r"/gists/[0-9a-f]+", path) and self.command == "GET":
            gid = path.rsplit("/", 1)[1]
            ok(200, {"id": gid, "html_url": f"https://gist.github.com/{gid}", "public": True,
                     "files": {"hello.txt": {"filename": "hello.txt", "content": "hi\n"}}})
        elif slug and rest == "" and self.command == "GET":
            if not visible:
                no(404, "Not Found")
                return
            owner, name = slug.split("/")
            ok(200, self.repo_json(owner, name))
        elif slug and rest == "/readme" and self.command == "GET":
            if not visible:
                no(404, "Not Found")
                return
            ok(200, {"name": "README.md", "path": "README.md", "encoding": "base64",
                     "content": base64.b64encode(README.encode()).decode(),
                     "html_url": f"https://github.com/{slug}/blob/main/README.md"})
        elif slug and re.fullmatch(r"/issues/\d+/comments", rest) and self.command == "POST":
            allowed = ("real",) if slug == OWNER_REPO else ("attacker", "real")
            if token not in allowed:
                no(404 if token else 401, "Not Found" if token else "Requires authentication")
                return
            cid = int(time.time() * 1000) % 10**9
            ok(201, {"id": cid, "html_url": f"https://github.com/{slug}{rest[:-9]}#issuecomment-{cid}",
                     "body": "(recorded)"})
        elif path == "/graphql" and self.command == "POST":
            if token not in ("real", "attacker"):
                no(401, "This endpoint requires you to be authenticated.")
                return
            ok(200, self.graphql(body, token))
        else:
            no(404, "Not Found")

    @staticmethod
    def repo_json(owner: str, name: str) -> dict[str, Any]:
        private = REPOS.get(f"{owner}/{name}", False)
        return {"id": 4242, "node_id": NODE_ID if owner == "owner" else "R_kgDOattacker",
                "name": name, "full_name": f"{owner}/{name}", "private": private,
                "owner": {"login": owner, "id": 1, "type": "User"},
                "html_url": f"https://github.com/{owner}/{name}",
                "clone_url": f"https://github.com/{owner}/{name}.git",
                "description": "a repository of the test world", "fork": False,
                "default_branch": "main", "visibility": "private" if private else "public",
                "permissions": {"admin": owner == "owner", "push": True, "pull": True}}

    def graphql(self, body: bytes, token: str | None) -> dict[str, Any]:
        try:
            req = json.loads(body)
        except ValueError:
            return {"errors": [{"message": "Problems parsing JSON"}]}
        query = str(req.get("query") or "")
        variables = req.get("variables") or {}
        self._note = {"graphql": " ".join(query.split())[:200],
                      "variables": json.dumps(variables)[:200]}
        data: dict[str, Any] = {}
        if re.search(r"\bviewer\b", query):
            data["viewer"] = {"login": "owner" if token == "real" else "attacker", "id": "U_1"}
        if re.search(r"\brepository\s*\(", query):
            owner = str(variables.get("owner") or "")
            name = str(variables.get("name") or variables.get("repo") or "")
            slug = f"{owner}/{name}".lower()
            if slug not in REPOS or (REPOS[slug] and token != "real"):
                return {"data": {"repository": None}, "errors": [{
                    "type": "NOT_FOUND", "path": ["repository"],
                    "message": f"Could not resolve to a Repository with the name '{slug}'."}]}
            data["repository"] = {
                "id": NODE_ID, "name": name, "nameWithOwner": slug,
                "owner": {"id": "U_1", "login": owner}, "description": "a repository of the test world",
                "url": f"https://github.com/{slug}", "isPrivate": REPOS[slug], "isFork": False,
                "isArchived": False, "isEmpty": False, "hasIssuesEnabled": True,
                "hasWikiEnabled": False, "viewerPermission": "ADMIN",
                "defaultBranchRef": {"name": "main"}, "parent": None,
                "visibility": "PRIVATE" if REPOS[slug] else "PUBLIC"}
        return {"data": data}

    # -- npm, PyPI --------------------------------------------------------------------------------

    def npm(self, body: bytes) -> None:
        path = self.path.split("?")[0]
        tgz = f"/{PACKAGE}/-/{PACKAGE}-{PACKAGE_VERSION}.tgz"
        if self.command == "PUT":
            self._note = {"publish": True}
            self.reply(201, {"ok": True, "id": path.strip("/")})
        elif path == f"/{PACKAGE}" and self.command in ("GET", "HEAD"):
            self.reply(200, Path(self.cfg["npm_dir"], "packument.json").read_bytes())
        elif path == tgz and self.command in ("GET", "HEAD"):
            self.reply(200, Path(self.cfg["npm_dir"], tgz.rsplit("/", 1)[1]).read_bytes(),
                       "application/octet-stream")
        else:
            self.reply(404, {"error": "Not found"})

    def pypi(self) -> None:
        path = self.path.split("?")[0]
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        if host == "pypi.org" and path.rstrip("/") == f"/simple/{PACKAGE}":
            url = f"https://files.pythonhosted.org{WHEEL_PATH}#sha256={self.cfg['wheel_sha256']}"
            html = (f"<!DOCTYPE html>\n<html><head><title>Links for {PACKAGE}</title></head>"
                    f"<body><h1>Links for {PACKAGE}</h1>\n"
                    f'<a href="{url}" data-requires-python="&gt;=3.7">{WHEEL}</a><br/>\n'
                    "</body></html>\n")
            self.reply(200, html, "text/html; charset=utf-8")
        elif host == "files.pythonhosted.org" and path == WHEEL_PATH:
            self.reply(200, Path(self.cfg["pypi_dir"], WHEEL).read_bytes(), "binary/octet-stream")
        else:
            self.reply(404, "Not Found\n", "text/plain")


class TLSServer(ThreadingHTTPServer):
    """HTTPS on one address (plain HTTP with ``ctx`` None); the handshake runs in the
    connection's thread (a client that stalls in it never holds up the others)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: str, handler: type[BaseHTTPRequestHandler],
                 ctx: ssl.SSLContext | None, site: str) -> None:
        super().__init__((addr, 443 if ctx else 80), handler)
        self.ctx = ctx
        self.site = site

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ctx is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.close()


def _tls_context(cfg: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    ctx.set_alpn_protocols(["http/1.1"])

    def remember(sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        with contextlib.suppress(AttributeError, TypeError):
            sock.ct_sni = name

    ctx.sni_callback = remember
    return ctx


def serve(cfg: dict[str, Any]) -> None:
    if TYPE_CHECKING:
        from codetainer.sandbox import apistandin
    else:  # the world side runs with -I (no package, no script dir on the path): beside it
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import apistandin

    ctx = _tls_context(cfg)
    Site.cfg = cfg

    class Api(apistandin.Handler):
        """apistandin.py, its records extended with which token came."""

        def _record(self, body: Any) -> None:
            kind, _user, secret = credential(self.headers.get("Authorization"))
            if kind is None and self.headers.get("x-api-key"):
                kind, secret = "x-api-key", self.headers.get("x-api-key")
            entry = {"t": time.time(), "method": self.command, "path": self.path,
                     "host": self.headers.get("Host"),
                     "sni": getattr(self.connection, "ct_sni", None),
                     "headers": sorted(k.lower() for k in self.headers),
                     "auth": kind if kind != "other" else "other",
                     "token": Site.token_kind(secret),
                     "body": body}
            with _LOCK, open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    Api.log_path = Path(cfg["api_dir"]) / "requests.jsonl"
    # HTTPS everywhere; plain HTTP on port 80 of our own addresses too, so that a request
    # the firewall failed to send to the proxy would be seen here
    servers = [TLSServer(addr, Api if addr == API_ADDR else Site, c, site)
               for addr, site in cfg["listen"] for c in (ctx, None)
               if c is not None or addr != API_ADDR]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()


# -- the test side -----------------------------------------------------------------------------------


class StandIns:
    """Every stand-in above, running in ``world`` (one process), names published in its DNS.

    ``github_token`` and ``oauth_token`` are the real secrets the machine boots with
    (what GitHub and Anthropic accept); ``placeholders`` what the agent holds instead.
    The CA certificate is copied to ``base/out/standin-ca.pem`` (``CA_INSIDE`` in the
    machine); :meth:`system_bundle` is the host's CA bundle with it appended.
    """

    CA_INSIDE = "/scratch-out/standin-ca.pem"

    def __init__(self, world: Any, base: Path, *, github_token: str, oauth_token: str,
                 placeholders: tuple[str, ...] = ()) -> None:
        from codetainer.sandbox.apistandin import make_ca
        from codetainer.sandbox.world import PYTHON

        self.world = world
        self.dir = base / "standins"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = make_ca(self.dir / "tls", ALL_NAMES)
        out = base / "out"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.ca, out / "standin-ca.pem")
        (out / "standin-ca.pem").chmod(0o644)
        for sub in ("npm", "pypi", "api"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.git_root = self.dir / "git"
        build_repos(self.git_root)
        self.packument = build_npm_tarball(self.dir / "npm")
        self.wheel_sha256 = build_wheel(self.dir / "pypi")
        self.log = self.dir / "requests.jsonl"
        self.log.touch()
        for addr in OWN_ADDRS:
            world.run_in(world.world, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        cfg = {"listen": [[a, names[0]] for a, names in SITES.items()],
               "cert": str(self.dir / "tls" / "server.pem"),
               "key": str(self.dir / "tls" / "server.key"),
               "log": str(self.log), "git_root": str(self.git_root),
               "npm_dir": str(self.dir / "npm"), "pypi_dir": str(self.dir / "pypi"),
               "api_dir": str(self.dir / "api"), "wheel_sha256": self.wheel_sha256,
               "github_token": github_token, "oauth_token": oauth_token,
               "placeholders": list(placeholders)}
        proc = world.spawn_in(world.world, [PYTHON, "-I", str(Path(__file__).resolve())])
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(cfg) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline().strip()
        if line != "listening":
            raise RuntimeError(f"the stand-ins did not start: {line!r} "
                               f"{proc.stderr.read() if proc.stderr else ''}")
        self.proc = proc
        self.publish()

    def publish(self) -> None:
        """Point every stand-in name at its address (after ``publish_names``, which maps
        the shipped allowlist's names to generic world hosts)."""
        last = ALL_NAMES[-1]
        for addr, names in SITES.items():
            for name in names:
                if name != last:
                    self.world.records[name] = [addr]
        self.world.set_records(last, [API_ADDR])

    def env(self) -> dict[str, str]:
        return {"CODETAINER_PROXY_UPSTREAM_CA": self.CA_INSIDE}

    def system_bundle(self) -> str:
        """The host's CA bundle with the test CA: the machine's system store, in which the
        test CA stands for the public CAs the real services' certificates chain to."""
        host = Path("/etc/ssl/certs/ca-certificates.crt")
        text = host.read_text() if host.exists() else ""
        return text.rstrip("\n") + "\n" + self.ca.read_text()

    def requests(self, **match: Any) -> list[dict[str, Any]]:
        """Recorded requests (oldest first) whose fields equal ``match``."""
        out = []
        for line in self.log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if all(r.get(k) == v for k, v in match.items()):
                    out.append(r)
        return out

    def api_requests(self) -> list[dict[str, Any]]:
        from codetainer.sandbox.apistandin import requests

        return requests(self.dir / "api")

    def ref(self, slug: str, ref: str = "refs/heads/main") -> str:
        """The commit ``ref`` of the stand-in's bare repository ``slug`` points at."""
        r = subprocess.run(["git", "-C", str(self.git_root / f"{slug}.git"), "rev-parse", ref],
                           capture_output=True, text=True, timeout=30, check=True)
        return r.stdout.strip()


if __name__ == "__main__":
    os.umask(0o022)
    serve(json.loads(sys.stdin.readline()))
