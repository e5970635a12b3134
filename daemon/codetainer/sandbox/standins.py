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

The server is standin_server.py, run in the world's namespace by :class:`StandIns`; this
module holds what both sides share (addresses, names, repositories, the package) and the
test side.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

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
        server = Path(__file__).resolve().parent / "standin_server.py"
        proc = world.spawn_in(world.world, [PYTHON, "-I", str(server)])
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
