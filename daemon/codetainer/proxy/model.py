"""Pure data of the policy proxy: rules, the rendered policy, requests and decisions.

Nothing here imports mitmproxy or the daemon: the daemon renders a :class:`ProxyPolicy`
to JSON, the proxy reads it back with :meth:`ProxyPolicy.from_json` (a file the daemon
wrote, validated again on read: a policy that does not parse leaves the proxy refusing
everything, never allowing more).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

PROXY_PORT = 3128
TRANSPARENT_PORT = 3129

#: named rule sets for common services (``preset=NAME`` on an allowlist line)
PRESETS = ("github", "npm", "pypi", "anthropic")

#: what the agent holds instead of a real credential; the proxy swaps in the real one
GITHUB_PLACEHOLDER = "codetainer-proxy-holds-the-github-token"
ANTHROPIC_PLACEHOLDER = "sk-ant-oat01-codetainer-proxy-holds-the-token"

#: files under ``<run_dir>/proxy/``
POLICY_FILE = "policy.json"
REFUSED_FILE = "refused.json"
CREDENTIALS_FILE = "credentials.json"  # 0400, the proxy's user: {"github": ..., "anthropic": ...}

METHOD = re.compile(r"[A-Z]{1,16}\Z")
PATH_PREFIX = re.compile(r"/[A-Za-z0-9._~!$&'()*+;=:@%/-]{0,200}\Z")
#: a GitHub GraphQL node ID (``R_kgDOAbCdEf``, or the legacy base64 ``MDEwOlJlcG9z…``)
REPO_ID = re.compile(r"[A-Za-z0-9_=+/-]{4,100}\Z")


@dataclass(frozen=True)
class Rules:
    """The optional rule part of an allowlist line; ``None`` fields allow anything."""

    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    preset: str | None = None

    def __str__(self) -> str:
        parts = []
        if self.preset:
            parts.append(f"preset={self.preset}")
        if self.methods is not None:
            parts.append("methods=" + ",".join(self.methods))
        if self.paths is not None:
            parts.append("paths=" + ",".join(self.paths))
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"methods": list(self.methods) if self.methods is not None else None,
                "paths": list(self.paths) if self.paths is not None else None,
                "preset": self.preset}

    @classmethod
    def from_dict(cls, data: Any) -> Rules:
        if not isinstance(data, dict):
            raise ValueError("rules: not an object")
        methods, paths, preset = data.get("methods"), data.get("paths"), data.get("preset")
        if methods is not None and not (isinstance(methods, list)
                                        and all(isinstance(m, str) and METHOD.match(m) for m in methods)):
            raise ValueError(f"rules: bad methods {methods!r}")
        if paths is not None and not (isinstance(paths, list)
                                      and all(isinstance(p, str) and PATH_PREFIX.match(p) for p in paths)):
            raise ValueError(f"rules: bad paths {paths!r}")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"rules: unknown preset {preset!r}")
        return cls(tuple(methods) if methods is not None else None,
                   tuple(paths) if paths is not None else None, preset)


@dataclass(frozen=True)
class PolicyEntry:
    """One allowlist entry as the proxy sees it."""

    kind: str  #: host, wildcard, cidr, github (the allowlist's EntryKind values)
    value: str  #: api.github.com, *.githubusercontent.com, 203.0.113.0/24, @github
    ports: tuple[int, ...]
    where: str  #: domains.conf:12, CODETAINER_ALLOW:1, codetainer allow:0
    rules: Rules | None = None  #: None: every method and path (an entry opened on purpose)
    expires: float | None = None  #: wall-clock expiry of a temporary grant

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "ports": list(self.ports),
                "where": self.where, "rules": self.rules.as_dict() if self.rules else None,
                "expires": self.expires}

    @classmethod
    def from_dict(cls, data: Any) -> PolicyEntry:
        if not isinstance(data, dict):
            raise ValueError("entry: not an object")
        kind, value, where = data.get("kind"), data.get("value"), data.get("where")
        ports, expires = data.get("ports"), data.get("expires")
        if kind not in ("host", "wildcard", "cidr", "github") or not isinstance(value, str) \
                or not isinstance(where, str):
            raise ValueError(f"entry: bad kind/value/where in {data!r:.120}")
        if not isinstance(ports, list) or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
            raise ValueError(f"entry {value}: bad ports")
        if expires is not None and not isinstance(expires, (int, float)):
            raise ValueError(f"entry {value}: bad expiry")
        rules = Rules.from_dict(data["rules"]) if data.get("rules") is not None else None
        return cls(kind, value.lower(), tuple(ports), where, rules,
                   float(expires) if expires is not None else None)


@dataclass(frozen=True)
class ProxyPolicy:
    entries: tuple[PolicyEntry, ...] = ()
    #: ``owner/repo`` (lower case) the GitHub preset lets the agent write to: the
    #: repository of REPO_URL and, for a fork, its upstream
    github_repos: tuple[str, ...] = ()
    #: @github's published ranges (CIDR text), for connections made by address
    github_ranges: tuple[str, ...] = ()
    #: GraphQL node IDs of ``github_repos`` (``R_kgDO…``): a GraphQL mutation passes only
    #: when every ``repositoryId`` it names is one of these
    github_repo_ids: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"version": 1, "entries": [e.as_dict() for e in self.entries],
                           "github_repos": list(self.github_repos),
                           "github_ranges": list(self.github_ranges),
                           "github_repo_ids": list(self.github_repo_ids)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ProxyPolicy:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("policy: not a version 1 policy")
        entries = data.get("entries")
        repos = data.get("github_repos", [])
        ranges = data.get("github_ranges", [])
        repo_ids = data.get("github_repo_ids", [])
        if not isinstance(entries, list) or not isinstance(repos, list) \
                or not isinstance(ranges, list) or not isinstance(repo_ids, list):
            raise ValueError("policy: entries, github_repos, github_ranges, github_repo_ids "
                             "must be lists")
        if not all(isinstance(r, str) and re.fullmatch(r"[a-z0-9._-]+/[a-z0-9._-]+", r) for r in repos):
            raise ValueError("policy: bad github_repos")
        if not all(isinstance(r, str) for r in ranges):
            raise ValueError("policy: bad github_ranges")
        if not all(isinstance(r, str) and REPO_ID.match(r) for r in repo_ids):
            raise ValueError("policy: bad github_repo_ids")
        return cls(tuple(PolicyEntry.from_dict(e) for e in entries), tuple(repos), tuple(ranges),
                   tuple(repo_ids))


@dataclass(frozen=True)
class HttpRequest:
    """What the policy decides on: one HTTP request as the proxy received it."""

    method: str  #: upper case
    host: str  #: the Host header (or the absolute-form URL's host), lower case, no port
    path: str  #: path with query, as sent
    port: int = 443
    scheme: str = "https"
    #: TLS server name the client sent (None: plain HTTP, or TLS without SNI)
    sni: str | None = None
    #: the CONNECT target host (explicit proxy) or None (transparent)
    connect_host: str | None = None
    #: the address the client connected to (transparent mode), else None
    dst_ip: str | None = None
    #: the request body when the policy needs it (GraphQL), else None
    body: bytes | None = None


#: what the proxy does to the request's credentials when it allows it
CREDENTIAL_NONE = ""  #: pass the request's headers through (a placeholder is removed)
CREDENTIAL_GITHUB_GIT = "github-git"  #: Authorization: Basic x-access-token:<GH_PAT>
CREDENTIAL_GITHUB_API = "github-api"  #: Authorization: token <GH_PAT>
CREDENTIAL_ANTHROPIC = "anthropic"  #: Authorization: Bearer <CLAUDE_CODE_OAUTH_TOKEN>, x-api-key dropped


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: the allowlist line that decided (``domains.conf:12``), "" when no entry matched
    where: str
    #: the rule that decided, short: ``preset=github (writes: owner/repo only)``
    rule: str
    #: one line for a person: why, and what to do if it should pass
    reason: str
    credential: str = CREDENTIAL_NONE


@dataclass
class RefusedRecord:
    """One refused (host, method, path) in ``refused.json``; ``path`` without its query."""

    host: str
    method: str
    path: str
    rule: str
    where: str
    reason: str
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "method": self.method, "path": self.path, "rule": self.rule,
                "where": self.where, "reason": self.reason, "count": self.count,
                "first": self.first, "last": self.last}
