"""The named rule sets of the policy proxy (``preset=NAME`` on an allowlist line).

Each preset is a pure function ``(request, policy) -> Verdict``: allowed or not, the rule
that decided (short), the reason (one line for a person) and the credential the proxy
puts on an allowed request. :func:`codetainer.proxy.policy.decide` calls a preset only
after the request's host matched the entry, its port is one of the entry's, it passed
the entry's own ``methods``/``paths`` (a preset with those allows the intersection) and
its path has no dot segment (:func:`canonical_path`).

The presets hold the write side of the issue-13 threat model: a prompt-injected agent
may read anything public, but may write only where the operator's work goes (the
repository of ``REPO_URL`` and its upstream, ``ProxyPolicy.github_repos``), and the
operator's credentials are added by the proxy to those requests only. A credential is
given only on the service's own host names, so a preset put on another name by mistake
never sends a token there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

from codetainer.proxy.model import (
    CREDENTIAL_ANTHROPIC,
    CREDENTIAL_GITHUB_API,
    CREDENTIAL_GITHUB_GIT,
    CREDENTIAL_NONE,
    HttpRequest,
    ProxyPolicy,
)

READS = frozenset({"GET", "HEAD", "OPTIONS"})


class Verdict(NamedTuple):
    allowed: bool
    rule: str
    reason: str
    credential: str = CREDENTIAL_NONE


Preset = Callable[[HttpRequest, ProxyPolicy], Verdict]


def split_path(path: str) -> tuple[str, str]:
    """``(path, query)`` of a request target; a fragment (never sent) is dropped."""
    path = path.split("#", 1)[0]
    head, _, query = path.partition("?")
    return head, query


def canonical_path(path: str) -> bool:
    """True when no server could read ``path`` as another one: it starts with ``/``,
    has no backslash, and no ``.``/``..`` segment even once percent-decoded
    (``/repos/me/r/%2e%2e/%2e%2e/them/x``). Rules compare the path as sent, so a path
    a server would normalise to somewhere else must not reach them."""
    head, _ = split_path(path)
    if not head.startswith("/"):
        return False
    decoded = unquote(head).replace("\\", "/")
    return "\\" not in head and not any(seg in (".", "..") for seg in decoded.split("/"))


# --- GitHub ----------------------------------------------------------------------------

GITHUB = "preset=github"

_OWNER = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})"
_REPO = r"[A-Za-z0-9._-]{1,100}"
#: git smart HTTP (and the LFS API beside it) on github.com
_GIT = re.compile(rf"/({_OWNER})/({_REPO})/(info/refs|git-upload-pack|git-receive-pack|info/lfs/.*)\Z")
_API_REPO = re.compile(rf"/repos/({_OWNER})/({_REPO})(/.*)?\Z")

#: REST paths under ``/repos/{o}/{r}/`` that administer the repository rather than work
#: in it: refused even on the configured repository. A webhook or a deploy key is a
#: standing channel out, a collaborator or a transfer hands the repository over, secrets
#: and self-hosted runners reach CI; none is the agent's work.
_ADMIN_FIRST = frozenset({"hooks", "keys", "collaborators", "invitations", "transfer",
                          "environments", "rulesets", "pages", "autolinks",
                          "vulnerability-alerts", "automated-security-fixes",
                          "private-vulnerability-reporting", "interaction-limits"})
_ADMIN_SECOND = frozenset({("actions", "secrets"), ("actions", "variables"),
                           ("actions", "permissions"), ("actions", "runners"),
                           ("actions", "oidc"), ("dependabot", "secrets"),
                           ("codespaces", "secrets"), ("tags", "protection")})


def _repo_key(owner: str, repo: str, git: bool = False) -> str:
    """``owner/repo`` lower case; git URLs may end in ``.git``, API paths never do."""
    repo = repo.lower()
    return owner.lower() + "/" + (repo[:-4] if git and repo.endswith(".git") else repo)


def _configured(policy: ProxyPolicy) -> str:
    return ", ".join(policy.github_repos) or "no repository (REPO_URL is not set)"


def github(req: HttpRequest, policy: ProxyPolicy) -> Verdict:
    """Reads anywhere; git fetch of any repository; git push and REST/GraphQL writes
    only to ``policy.github_repos``; the token only on requests for those."""
    path, query = split_path(req.path)
    if req.host == "github.com":
        return _github_web(req, policy, path, query)
    if req.method in READS and _receive_pack(path, query):  # writes are decided below
        return _stray_push(policy, path)
    if req.host in ("api.github.com", "uploads.github.com"):
        return _github_api(req, policy, path, query)
    if req.method in READS:
        # npm.pkg.github.com serves the operator's private packages: reads get the token
        cred = CREDENTIAL_GITHUB_API if req.host == "npm.pkg.github.com" else CREDENTIAL_NONE
        return Verdict(True, f"{GITHUB} (reads)", f"{req.method} is a read", cred)
    return Verdict(False, f"{GITHUB} (reads only on {req.host})",
                   f"{GITHUB} allows only reads (GET, HEAD, OPTIONS) on {req.host}: "
                   f"{req.method} {path} is a write")


def _receive_pack(path: str, query: str) -> bool:
    """Push discovery or a push, whatever the path: never taken for a read."""
    return path.endswith("git-receive-pack") or \
        "git-receive-pack" in parse_qs(query).get("service", [])


def _stray_push(policy: ProxyPolicy, path: str) -> Verdict:
    return Verdict(False, f"{GITHUB} (git push: {_configured(policy)} only)",
                   f"{GITHUB} lets git push reach {_configured(policy)} only (REPO_URL); "
                   f"{path} is not a push to it")


def _github_web(req: HttpRequest, policy: ProxyPolicy, path: str, query: str) -> Verdict:
    m = _GIT.match(path)
    if m is not None:
        repo, what = _repo_key(m.group(1), m.group(2), git=True), m.group(3)
        mine = repo in policy.github_repos
        services = parse_qs(query).get("service", []) if what == "info/refs" else []
        if len(services) > 1:
            return Verdict(False, f"{GITHUB} (git)", f"info/refs names {len(services)} services")
        push = what == "git-receive-pack" or services == ["git-receive-pack"]
        if what.startswith("info/lfs/"):
            push = req.method not in READS  # the LFS batch API is a POST for any operation
        if push and not mine:
            return Verdict(False, f"{GITHUB} (git push: {_configured(policy)} only)",
                           f"{GITHUB} lets git push reach {_configured(policy)} only "
                           f"(REPO_URL); a push to {repo} is refused")
        verb = "push to" if push else "fetch of"
        methods = {"info/refs": READS, "git-upload-pack": {"POST"}, "git-receive-pack": {"POST"}}
        if req.method in methods.get(what, READS | {"POST"}):
            return Verdict(True, f"{GITHUB} (git)", f"git {verb} {repo}",
                           CREDENTIAL_GITHUB_GIT if mine else CREDENTIAL_NONE)
        return Verdict(False, f"{GITHUB} (git)", f"{req.method} {what} is not git smart HTTP")
    if _receive_pack(path, query):
        return _stray_push(policy, path)
    if req.method in READS:
        return Verdict(True, f"{GITHUB} (reads)", f"{req.method} is a read")
    return Verdict(False, f"{GITHUB} (github.com: reads and git only)",
                   f"{GITHUB} allows reads and git on github.com: {req.method} {path} is "
                   f"neither (writes go through api.github.com, to {_configured(policy)} only)")


def _github_api(req: HttpRequest, policy: ProxyPolicy, path: str, query: str) -> Verdict:
    if req.host == "api.github.com" and path == "/graphql":
        if req.method == "POST":
            return _graphql(req, policy)
        if req.method in READS and not query:
            return Verdict(True, f"{GITHUB} (reads)", f"{req.method} /graphql runs no operation")
        return Verdict(False, f"{GITHUB} (GraphQL by POST)",
                       f"{GITHUB} takes GraphQL operations by POST only (the body is checked)")
    m = _API_REPO.match(path)
    repo = _repo_key(m.group(1), m.group(2)) if m else None
    mine = repo is not None and repo in policy.github_repos
    cred = CREDENTIAL_GITHUB_API if mine else CREDENTIAL_NONE
    if req.method in READS:
        return Verdict(True, f"{GITHUB} (reads)", f"{req.method} is a read", cred)
    if mine and m is not None:
        rest = [s for s in (m.group(3) or "").split("/") if s]
        if _is_admin(rest):
            return Verdict(False, f"{GITHUB} (no repository administration)",
                           f"{GITHUB} keeps repository administration (settings, hooks, keys, "
                           f"collaborators, secrets, runners) from the agent: {req.method} {path}")
        return Verdict(True, f"{GITHUB} (writes: {_configured(policy)})",
                       f"a write to {repo}, the configured repository", cred)
    if not policy.github_repos:
        return Verdict(False, f"{GITHUB} (writes: none, REPO_URL is not set)",
                       f"{GITHUB} lets writes reach REPO_URL's repository only, and REPO_URL "
                       f"is not set; {req.method} {path} is a write")
    return Verdict(False, f"{GITHUB} (writes: {_configured(policy)} only)",
                   f"{GITHUB} lets writes reach {_configured(policy)} only (REPO_URL); "
                   f"{req.method} {path} is a write elsewhere")


def _is_admin(rest: list[str]) -> bool:
    if not rest:
        return True  # PATCH/DELETE /repos/{o}/{r}: settings, visibility, deletion
    if rest[0] in _ADMIN_FIRST or tuple(rest[:2]) in _ADMIN_SECOND:
        return True
    return rest[0] == "branches" and "protection" in rest[2:3]


# --- GitHub GraphQL --------------------------------------------------------------------

#: top-level mutations whose target repository is their ``repositoryId`` argument: the
#: only ones the policy can check. Others name their target by another node (an issue,
#: a pull request: ``addComment(subjectId:)``) that the proxy cannot place in a
#: repository, so they are refused whatever else the request carries.
REPO_MUTATIONS = frozenset({"createPullRequest", "createIssue", "createDiscussion",
                            "createLabel", "createRef"})
_GQL_REFUSED = "GraphQL mutations only on the configured repository"

_GQL_TOKEN = re.compile(r'''
    (?P<skip>[\s,\ufeff]+|\#[^\n\r]*)
  | (?P<string>"""(?:\\"""|[^"]|"(?!""))*"""|"(?:\\.|[^"\\\n\r])*")
  | (?P<spread>\.\.\.)
  | (?P<var>\$[_A-Za-z][_0-9A-Za-z]*)
  | (?P<name>[_A-Za-z][_0-9A-Za-z]*)
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<punct>[!(){}\[\]:=@|&])
''', re.VERBOSE)


class GraphQLError(ValueError):
    pass


def _tokens(doc: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(doc):
        m = _GQL_TOKEN.match(doc, pos)
        if m is None or m.lastgroup is None:
            raise GraphQLError(f"unexpected {doc[pos:pos + 10]!r} at {pos}")
        if m.lastgroup != "skip":
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def _balanced(toks: list[tuple[str, str]], i: int) -> int:
    """Index after the bracket group opening at ``toks[i]``."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    stack = [pairs[toks[i][1]]]
    i += 1
    while stack:
        if i >= len(toks):
            raise GraphQLError("unbalanced brackets")
        kind, text = toks[i]
        if kind == "punct" and text in pairs:
            stack.append(pairs[text])
        elif kind == "punct" and text in ")}]" and text != stack.pop():
            raise GraphQLError("mismatched brackets")
        i += 1
    return i


def _operations(toks: list[tuple[str, str]]) -> Iterator[tuple[str, int]]:
    """``(operation type, index of its selection set's '{')`` of each operation."""
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        if (kind, text) == ("punct", "{"):
            yield "query", i
            i = _balanced(toks, i)
            continue
        if kind != "name" or text not in ("query", "mutation", "subscription", "fragment"):
            raise GraphQLError(f"unexpected {text!r} at the top of the document")
        j = i + 1
        while j < len(toks) and toks[j] != ("punct", "{"):
            j = _balanced(toks, j) if toks[j][1] in ("(", "[") and toks[j][0] == "punct" else j + 1
        if j >= len(toks):
            raise GraphQLError(f"{text} without a selection set")
        if text != "fragment":
            yield text, j
        i = _balanced(toks, j)


def _top_fields(toks: list[tuple[str, str]], i: int) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """``(field name, argument tokens)`` of the selection set opening at ``toks[i]``."""
    end = _balanced(toks, i) - 1
    i += 1
    while i < end:
        kind, text = toks[i]
        if kind == "spread":
            raise GraphQLError("a fragment at the top of a mutation")
        if kind != "name":
            raise GraphQLError(f"unexpected {text!r} in a selection set")
        name, i = text, i + 1
        if toks[i] == ("punct", ":"):
            if toks[i + 1][0] != "name":
                raise GraphQLError("alias without a field")
            name, i = toks[i + 1][1], i + 2
        args: list[tuple[str, str]] = []
        if toks[i] == ("punct", "("):
            close = _balanced(toks, i)
            args, i = toks[i + 1 : close - 1], close
        while toks[i] == ("punct", "@"):  # directives
            i += 2
            if toks[i] == ("punct", "("):
                i = _balanced(toks, i)
        if toks[i] == ("punct", "{"):
            i = _balanced(toks, i)
        yield name, args


def _variable_repo_ids(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "repositoryId":
                yield item
            yield from _variable_repo_ids(item)
    elif isinstance(value, list):
        for item in value:
            yield from _variable_repo_ids(item)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        # servers disagree on which duplicate wins: a check must not pick one
        raise GraphQLError("a JSON object with a key twice")
    return dict(pairs)


def graphql_check(body: bytes | None, repo_ids: tuple[str, ...]) -> tuple[bool, str]:
    """``(allowed, why)`` for a GraphQL request body: a query passes; a mutation only
    when its top-level fields are all :data:`REPO_MUTATIONS` and every ``repositoryId``
    it carries (in the variables, at any depth, or bound to one in the document) is one
    of ``repo_ids``, with at least one present."""
    if not body:
        return False, "no request body to check"
    try:
        data = json.loads(body, object_pairs_hook=_no_duplicate_keys)
        if not isinstance(data, dict) or not isinstance(data.get("query"), str):
            return False, "the body is not a GraphQL request ({\"query\": ...})"
        variables = data.get("variables") or {}
        if not isinstance(variables, dict):
            return False, "variables is not an object"
        toks = _tokens(data["query"])
        ops = list(_operations(toks))
        if not ops:
            return False, "no operation in the document"
        if all(kind == "query" for kind, _ in ops):
            return True, "a GraphQL query"
        found: list[Any] = list(_variable_repo_ids(variables))
        for kind, start in ops:
            if kind == "subscription":
                return False, "a GraphQL subscription"
            if kind != "mutation":
                continue
            for name, args in _top_fields(toks, start):
                if name not in REPO_MUTATIONS:
                    return False, f"mutation {name} does not name its repository by repositoryId"
                for k, (kind_, text) in enumerate(args[:-2]):
                    if (kind_, text) == ("name", "repositoryId") and args[k + 1] == ("punct", ":"):
                        if args[k + 2][0] != "var":
                            return False, "repositoryId must come from a variable"
                        found.append(variables.get(args[k + 2][1][1:]))
    except (GraphQLError, ValueError, IndexError, RecursionError) as exc:
        return False, f"the GraphQL request does not parse ({str(exc)[:80]})"
    if not found:
        return False, "the mutation names no repositoryId"
    bad = [v for v in found if not (isinstance(v, str) and v in repo_ids)]
    if bad:
        return False, f"repositoryId {str(bad[0])[:40]!r} is not the configured repository"
    return True, "a GraphQL mutation on the configured repository"


def _graphql(req: HttpRequest, policy: ProxyPolicy) -> Verdict:
    ok, why = graphql_check(req.body, policy.github_repo_ids)
    if ok:
        return Verdict(True, f"{GITHUB} (GraphQL)", why, CREDENTIAL_GITHUB_API)
    return Verdict(False, f"{GITHUB} (GraphQL mutations: {_configured(policy)} only)",
                   f"{GITHUB}: {_GQL_REFUSED} ({_configured(policy)}); {why}")


# --- package registries ------------------------------------------------------------------

#: ``npm install`` runs ``npm audit`` by default and POSTs the dependency tree (names and
#: versions) to these; refusing them turns every install into a warning. The registry
#: answers with advisories and publishes nothing of the body, so these POSTs are no
#: channel to a third party; every other write (publish, login, dist-tag) is refused.
NPM_AUDIT = ("/-/npm/v1/security/advisories/bulk", "/-/npm/v1/security/audits/quick")


def npm(req: HttpRequest, policy: ProxyPolicy) -> Verdict:
    path, _ = split_path(req.path)
    if req.method in ("GET", "HEAD"):
        return Verdict(True, "preset=npm (downloads)", f"{req.method} is a download")
    if req.method == "POST" and path in NPM_AUDIT:
        return Verdict(True, "preset=npm (audit)", "npm install's audit request")
    return Verdict(False, "preset=npm (downloads only)",
                   f"preset=npm allows downloads (GET, HEAD) and npm's audit only: "
                   f"{req.method} {path} (npm publish, login, dist-tag) is refused")


def pypi(req: HttpRequest, policy: ProxyPolicy) -> Verdict:
    path, _ = split_path(req.path)
    if req.method in ("GET", "HEAD"):
        return Verdict(True, "preset=pypi (downloads)", f"{req.method} is a download")
    return Verdict(False, "preset=pypi (downloads only)",
                   f"preset=pypi allows downloads (GET, HEAD) only: {req.method} {path} is refused")


# --- Anthropic ---------------------------------------------------------------------------

ANTHROPIC_HOST = "api.anthropic.com"
ANTHROPIC_PATHS = ("/v1/", "/api/")


def anthropic(req: HttpRequest, policy: ProxyPolicy) -> Verdict:
    """The CLI's API calls. The proxy replaces whatever authentication the agent sent
    with the operator's token (:data:`CREDENTIAL_ANTHROPIC`), so a key the agent was
    handed cannot send the conversation to another account."""
    path, _ = split_path(req.path)
    if not path.startswith(ANTHROPIC_PATHS):
        return Verdict(False, "preset=anthropic (/v1/, /api/)",
                       f"preset=anthropic allows the API under /v1/ and /api/ only: {path}")
    cred = CREDENTIAL_ANTHROPIC if req.host == ANTHROPIC_HOST else CREDENTIAL_NONE
    return Verdict(True, "preset=anthropic", "the Anthropic API", cred)


PRESET_FUNCS: dict[str, Preset] = {"github": github, "npm": npm, "pypi": pypi,
                                   "anthropic": anthropic}
