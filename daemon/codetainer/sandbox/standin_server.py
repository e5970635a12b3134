"""The stand-ins' server process (see standins.py): GitHub, npm, PyPI, sentry.io and
Anthropic's API on their addresses in the world's namespace, HTTPS (and plain HTTP on
port 80 of its own addresses), every request recorded.

Run as ``python3 -I standin_server.py`` in the world's namespace (``StandIns`` does
this), its configuration (the tokens among it) on stdin; prints ``listening`` once every
address accepts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codetainer.sandbox import standins as shared
else:  # run with -I (no package, no script dir on the path): the module beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import standins as shared


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
        if secret in (shared.ATTACKER_TOKEN, shared.NPM_ATTACKER_TOKEN):
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
            elif host in shared.GITHUB_NAMES:
                self.github_web(body)
            elif host == "registry.npmjs.org":
                self.npm(body)
            elif host in shared.PYPI_NAMES:
                self.pypi()
            elif host in shared.SENTRY_NAMES:
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
        if slug not in shared.REPOS:
            self.reply(404, "Repository not found.\n", "text/plain")
            return
        push = "git-receive-pack" in path or "service=git-receive-pack" in query
        kind, token = self._secret()
        self._note = {"repo": slug, "push": push}
        if shared.REPOS[slug] or push:
            # the real token opens the configured repository; the attacker's own token
            # pushes to the attacker's repository; anything else is told to authenticate
            want = "real" if slug == shared.OWNER_REPO else "attacker"
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
        visible = slug in shared.REPOS and (not shared.REPOS[slug] or token == "real")
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
                     "content": base64.b64encode(shared.README.encode()).decode(),
                     "html_url": f"https://github.com/{slug}/blob/main/README.md"})
        elif slug and re.fullmatch(r"/issues/\d+/comments", rest) and self.command == "POST":
            allowed = ("real",) if slug == shared.OWNER_REPO else ("attacker", "real")
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
        private = shared.REPOS.get(f"{owner}/{name}", False)
        return {"id": 4242, "node_id": shared.NODE_ID if owner == "owner" else "R_kgDOattacker",
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
            if slug not in shared.REPOS or (shared.REPOS[slug] and token != "real"):
                return {"data": {"repository": None}, "errors": [{
                    "type": "NOT_FOUND", "path": ["repository"],
                    "message": f"Could not resolve to a Repository with the name '{slug}'."}]}
            data["repository"] = {
                "id": shared.NODE_ID, "name": name, "nameWithOwner": slug,
                "owner": {"id": "U_1", "login": owner}, "description": "a repository of the test world",
                "url": f"https://github.com/{slug}", "isPrivate": shared.REPOS[slug], "isFork": False,
                "isArchived": False, "isEmpty": False, "hasIssuesEnabled": True,
                "hasWikiEnabled": False, "viewerPermission": "ADMIN",
                "defaultBranchRef": {"name": "main"}, "parent": None,
                "visibility": "PRIVATE" if shared.REPOS[slug] else "PUBLIC"}
        return {"data": data}

    # -- npm, PyPI --------------------------------------------------------------------------------

    def npm(self, body: bytes) -> None:
        path = self.path.split("?")[0]
        tgz = f"/{shared.PACKAGE}/-/{shared.PACKAGE}-{shared.PACKAGE_VERSION}.tgz"
        if self.command == "PUT":
            self._note = {"publish": True}
            self.reply(201, {"ok": True, "id": path.strip("/")})
        elif path == f"/{shared.PACKAGE}" and self.command in ("GET", "HEAD"):
            self.reply(200, Path(self.cfg["npm_dir"], "packument.json").read_bytes())
        elif path == tgz and self.command in ("GET", "HEAD"):
            self.reply(200, Path(self.cfg["npm_dir"], tgz.rsplit("/", 1)[1]).read_bytes(),
                       "application/octet-stream")
        else:
            self.reply(404, {"error": "Not found"})

    def pypi(self) -> None:
        path = self.path.split("?")[0]
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        if host == "pypi.org" and path.rstrip("/") == f"/simple/{shared.PACKAGE}":
            url = f"https://files.pythonhosted.org{shared.WHEEL_PATH}#sha256={self.cfg['wheel_sha256']}"
            html = (f"<!DOCTYPE html>\n<html><head><title>Links for {shared.PACKAGE}</title></head>"
                    f"<body><h1>Links for {shared.PACKAGE}</h1>\n"
                    f'<a href="{url}" data-requires-python="&gt;=3.7">{shared.WHEEL}</a><br/>\n'
                    "</body></html>\n")
            self.reply(200, html, "text/html; charset=utf-8")
        elif host == "files.pythonhosted.org" and path == shared.WHEEL_PATH:
            self.reply(200, Path(self.cfg["pypi_dir"], shared.WHEEL).read_bytes(), "binary/octet-stream")
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
    servers = [TLSServer(addr, Api if addr == shared.API_ADDR else Site, c, site)
               for addr, site in cfg["listen"] for c in (ctx, None)
               if c is not None or addr != shared.API_ADDR]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    os.umask(0o022)
    serve(json.loads(sys.stdin.readline()))
