"""The proxy's request policy: host agreement, matching, ports, rules, and every preset."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from codetainer.network.allowlist import parse_text, policy_entry
from codetainer.proxy.model import (
    CREDENTIAL_ANTHROPIC,
    CREDENTIAL_GITHUB_API,
    CREDENTIAL_GITHUB_GIT,
    CREDENTIAL_NONE,
    Decision,
    HttpRequest,
    PolicyEntry,
    ProxyPolicy,
    Rules,
)
from codetainer.proxy.policy import compiled, decide, match_entries
from codetainer.proxy.presets import READS, canonical_path, graphql_check
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = 1_700_000_000.0

CONF = """\
api.anthropic.com preset=anthropic
github.com preset=github
api.github.com preset=github
uploads.github.com preset=github
codeload.github.com preset=github
*.githubusercontent.com preset=github
ghcr.io preset=github
npm.pkg.github.com preset=github
registry.npmjs.org preset=npm
pypi.org preset=pypi
files.pythonhosted.org preset=pypi
deb.debian.org methods=GET,HEAD
open.example.com:443,8443
api.example.com:443 methods=GET,POST paths=/v1/,/v2/public
*.example.net
x.cdn.example.com methods=HEAD
*.cdn.example.com methods=GET
203.0.113.0/24:443 methods=GET
203.0.113.128/25:443
[2001:db8::/32]:443 methods=GET
@github
*.example.org preset=github
evil.example preset=anthropic
"""
REPOS = ("me/work", "upstream/work")
REPO_IDS = ("R_kgDOwork", "R_kgDOupstream")
GITHUB_RANGES = ("192.0.2.0/24",)


def make_policy(text: str = CONF, *extra: PolicyEntry) -> ProxyPolicy:
    entries = tuple(policy_entry(e) for e in parse_text(text, "domains.conf")) + extra
    return ProxyPolicy(entries, REPOS, GITHUB_RANGES, REPO_IDS)


POLICY = make_policy()


def req(method: str, host: str, path: str = "/", **kw: Any) -> HttpRequest:
    kw.setdefault("sni", host if kw.get("scheme", "https") == "https" else None)
    return HttpRequest(method, host, path, **kw)


def check(method: str, host: str, path: str = "/", policy: ProxyPolicy = POLICY,
          **kw: Any) -> Decision:
    return decide(policy, req(method, host, path, **kw), NOW)


def allowed(method: str, host: str, path: str = "/", cred: str = CREDENTIAL_NONE,
            **kw: Any) -> Decision:
    d = check(method, host, path, **kw)
    assert d.allowed, d
    assert d.credential == cred, d
    return d


def refused(method: str, host: str, path: str = "/", why: str = "", **kw: Any) -> Decision:
    d = check(method, host, path, **kw)
    assert not d.allowed, d
    assert d.credential == CREDENTIAL_NONE
    assert why in d.reason, d.reason
    assert "\n" not in d.reason
    return d


def where_of(value: str, policy: ProxyPolicy = POLICY) -> str:
    return next(e.where for e in policy.entries if e.value == value)


# --- host agreement ------------------------------------------------------------------


def test_sni_and_host_must_agree() -> None:
    d = refused("GET", "evil.example.com", sni="api.github.com",
                why="SNI api.github.com and Host evil.example.com differ")
    assert d.where == "" and d.rule == "SNI = Host"
    # the other way round too: an allowlisted Host behind another name's TLS
    refused("GET", "api.github.com", sni="evil.example.com", why="differ")
    # case and a trailing dot are not a difference
    allowed("GET", "API.GitHub.com.", sni="api.github.com")


def test_connect_target_must_agree() -> None:
    d = refused("GET", "api.github.com", connect_host="evil.example.com",
                why="CONNECT evil.example.com and Host api.github.com differ")
    assert d.rule == "CONNECT = Host"
    allowed("GET", "api.github.com", connect_host="API.github.com")
    # plain HTTP through the explicit proxy: no SNI, no CONNECT
    allowed("GET", "deb.debian.org", "/debian/dists/", scheme="http", port=80)


def test_bare_address_must_be_the_address_connected_to() -> None:
    refused("GET", "203.0.113.5", sni=None, dst_ip="203.0.113.9",
            why="connected to 203.0.113.9 but Host names 203.0.113.5")
    allowed("GET", "203.0.113.5", sni=None, dst_ip="::ffff:203.0.113.5")


def test_request_without_host_is_refused() -> None:
    refused("GET", "", sni=None, why="names no host")


# --- matching --------------------------------------------------------------------------


def test_unlisted_host_is_refused_with_how_to_allow_it() -> None:
    d = refused("GET", "evil.example.com", why="evil.example.com is not in the allowlist")
    assert d.where == "" and "network/domains.conf" in d.reason
    assert "codetainer allow evil.example.com" in d.reason


def test_a_name_is_decided_by_name_entries_only() -> None:
    # gist.github.com lives on GitHub's addresses (@github is listed): not by name
    refused("POST", "gist.github.com", "/", dst_ip="192.0.2.10", why="not in the allowlist")
    refused("GET", "example.com", dst_ip="203.0.113.200", why="not in the allowlist")


def test_wildcards_cover_strict_subdomains_only() -> None:
    allowed("DELETE", "a.example.net")
    allowed("GET", "a.b.example.net")
    refused("GET", "example.net", why="not in the allowlist")
    refused("GET", "xexample.net", why="not in the allowlist")


def test_any_matching_entry_allows_and_refusal_names_the_most_specific() -> None:
    # x.cdn.example.com methods=HEAD (exact) and *.cdn.example.com methods=GET
    d = allowed("GET", "x.cdn.example.com")
    assert d.where == where_of("*.cdn.example.com")
    d = allowed("HEAD", "x.cdn.example.com")
    assert d.where == where_of("x.cdn.example.com")
    d = refused("POST", "x.cdn.example.com", why="allows HEAD only: POST is refused")
    assert d.where == where_of("x.cdn.example.com") and d.rule == "methods=HEAD"
    d = refused("POST", "y.cdn.example.com", why="allows GET only")
    assert d.where == where_of("*.cdn.example.com")


def test_match_entries_order_and_expiry() -> None:
    grant = PolicyEntry("host", "x.cdn.example.com", (443,), "codetainer allow:0", None, NOW - 1)
    p = make_policy(CONF, grant)
    assert [e.value for e in match_entries(p, "X.cdn.example.com.", NOW)] == [
        "x.cdn.example.com", "*.cdn.example.com"]
    assert [e.where for e in match_entries(p, "x.cdn.example.com", NOW - 2)] == [
        where_of("x.cdn.example.com"), grant.where, where_of("*.cdn.example.com")]
    assert [e.value for e in match_entries(p, "203.0.113.200", NOW)] == [
        "203.0.113.128/25", "203.0.113.0/24"]
    assert [e.value for e in match_entries(p, "192.0.2.1", NOW)] == ["@github"]
    assert [e.value for e in match_entries(p, "[2001:db8::5]", NOW)] == ["2001:db8::/32"]
    assert match_entries(p, "198.51.100.1", NOW) == []
    assert match_entries(p, "", NOW) == []


def test_bare_ip_is_matched_by_networks_and_github_ranges() -> None:
    d = allowed("GET", "203.0.113.5", sni=None)
    assert d.where == where_of("203.0.113.0/24")
    d = refused("POST", "203.0.113.5", sni=None, why="allows GET only")
    assert d.where == where_of("203.0.113.0/24")
    d = allowed("POST", "203.0.113.200", sni=None)  # the /25 has no rules
    assert d.where == where_of("203.0.113.128/25")
    allowed("GET", "[2001:DB8::1]", sni=None)
    refused("PUT", "2001:db8::1", sni=None, why="allows GET only")
    d = allowed("POST", "192.0.2.7", sni=None)  # @github: no rules
    assert d.where == where_of("@github")
    d = refused("GET", "198.51.100.1", sni=None, why="no network entry covers 198.51.100.1")
    assert "codetainer allow 198.51.100.1" in d.reason
    # without @github, GitHub's ranges open nothing
    no_gh = make_policy(CONF.replace("@github\n", ""))
    refused("GET", "192.0.2.7", policy=no_gh, sni=None, why="no network entry")


def test_ports() -> None:
    allowed("DELETE", "open.example.com", port=8443)
    d = refused("GET", "api.example.com", "/v1/", port=8443,
                why="port 8443 is not allowed for api.example.com")
    assert d.where == where_of("api.example.com") and d.rule == "ports 443"
    refused("GET", "203.0.113.5", sni=None, port=80, why="port 80")


def test_expired_grant_is_ignored() -> None:
    def grant(expires: float) -> ProxyPolicy:
        return make_policy(CONF, PolicyEntry("host", "api.github.com", (443,), "codetainer allow:0",
                                             Rules(("POST",), ("/gists",)), expires))

    d = check("POST", "api.github.com", "/gists", policy=grant(NOW - 1))
    assert not d.allowed and d.where == where_of("api.github.com")
    d = check("POST", "api.github.com", "/gists", policy=grant(NOW + 60))
    assert d.allowed and d.where == "codetainer allow:0" and d.credential == CREDENTIAL_NONE
    # the grant does not take the token from the preset's own requests
    d = check("POST", "api.github.com", "/repos/me/work/issues", policy=grant(NOW + 60))
    assert d.allowed and d.credential == CREDENTIAL_GITHUB_API


def test_unlisted_host_granted_for_a_while() -> None:
    grant = PolicyEntry("host", "new.example.com", (443,), "codetainer allow:0", None, NOW + 5)
    p = make_policy(CONF, grant)
    assert check("POST", "new.example.com", policy=p).allowed
    assert not decide(p, req("POST", "new.example.com"), NOW + 5).allowed


# --- methods and paths ---------------------------------------------------------------


def test_entry_without_rules_allows_everything() -> None:
    d = allowed("PATCH", "open.example.com", "/../anything\\odd")
    assert d.rule == "no rules" and "every method and path" in d.reason


def test_methods_and_paths() -> None:
    allowed("POST", "api.example.com", "/v1/things?x=1")
    allowed("GET", "api.example.com", "/v2/public/x")
    allowed("GET", "api.example.com", "/v2/publicity")  # a plain string prefix
    d = refused("PUT", "api.example.com", "/v1/x", why="allows GET,POST only: PUT is refused")
    assert d.rule == "methods=GET,POST"
    d = refused("GET", "api.example.com", "/v3/x", why="allows paths under /v1/,/v2/public only")
    assert d.rule == "paths=/v1/,/v2/public"
    refused("GET", "api.example.com", "/x?/v1/", why="paths under")  # the query is not the path
    allowed("GET", "deb.debian.org", "/debian/pool/x.deb")
    d = refused("POST", "deb.debian.org", "/", why="allows GET,HEAD only")
    assert d.where == where_of("deb.debian.org")


@pytest.mark.parametrize(
    "path",
    ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/%2E./admin", "/v1/.%2e/admin", "/v1/./x",
     "/v1/..", "/v1\\..\\admin", "/v1/%5c..%5cadmin", "/v1/..%2fadmin", "v1/x", "*"],
)
def test_paths_a_server_could_read_as_another_are_refused(path: str) -> None:
    assert not canonical_path(path)
    d = refused("POST", "api.example.com", path, why="")
    assert d.rule in ("canonical path", "paths=/v1/,/v2/public")


def test_canonical_paths() -> None:
    for path in ("/", "/a/b.c/..d/e..", "/@types%2fnode", "/a?x=/../", "/a#/../"):
        assert canonical_path(path), path


def test_preset_with_methods_allows_the_intersection() -> None:
    p = make_policy("api.anthropic.com preset=anthropic methods=POST\n")
    d = check("POST", "api.anthropic.com", "/v1/messages", policy=p)
    assert d.allowed and d.credential == CREDENTIAL_ANTHROPIC
    d = check("GET", "api.anthropic.com", "/v1/models", policy=p)
    assert not d.allowed and d.rule == "methods=POST"
    d = check("POST", "api.anthropic.com", "/other", policy=p)
    assert not d.allowed and d.rule.startswith("preset=anthropic")


# --- preset=github: github.com, git --------------------------------------------------


def test_git_fetch_of_any_repository() -> None:
    allowed("GET", "github.com", "/torvalds/linux.git/info/refs?service=git-upload-pack")
    allowed("POST", "github.com", "/torvalds/linux.git/git-upload-pack")
    allowed("GET", "github.com", "/torvalds/linux/info/refs?service=git-upload-pack")
    allowed("POST", "github.com", "/torvalds/linux/git-upload-pack")
    allowed("GET", "github.com", "/torvalds/linux.git/info/refs")  # dumb HTTP
    # the configured repository's fetch carries the token (it may be private)
    allowed("GET", "github.com", "/me/work.git/info/refs?service=git-upload-pack",
            CREDENTIAL_GITHUB_GIT)
    allowed("POST", "github.com", "/upstream/work/git-upload-pack", CREDENTIAL_GITHUB_GIT)


def test_push_to_another_repository_is_refused() -> None:
    d = refused("GET", "github.com", "/attacker/loot.git/info/refs?service=git-receive-pack",
                why="lets git push reach me/work, upstream/work only (REPO_URL); "
                    "a push to attacker/loot is refused")
    assert d.where == where_of("github.com") and d.rule.startswith("preset=github")
    refused("POST", "github.com", "/attacker/loot.git/git-receive-pack", why="push to attacker/loot")
    refused("POST", "github.com", "/attacker/loot/git-receive-pack", why="push")
    # a repository named like the configured one under another owner, or the other way
    refused("POST", "github.com", "/me/work2.git/git-receive-pack", why="push to me/work2")
    refused("POST", "github.com", "/other/work.git/git-receive-pack", why="push to other/work")


def test_push_to_the_configured_repository_carries_the_token() -> None:
    allowed("GET", "github.com", "/me/work.git/info/refs?service=git-receive-pack",
            CREDENTIAL_GITHUB_GIT)
    allowed("POST", "github.com", "/Me/Work.git/git-receive-pack", CREDENTIAL_GITHUB_GIT)
    allowed("POST", "github.com", "/upstream/work/git-receive-pack", CREDENTIAL_GITHUB_GIT)
    allowed("POST", "github.com", "/me/work.git/info/lfs/objects/batch", CREDENTIAL_GITHUB_GIT)
    refused("POST", "github.com", "/attacker/loot.git/info/lfs/objects/batch", why="push")


def test_git_requests_out_of_shape_are_refused() -> None:
    refused("GET", "github.com",
            "/attacker/loot.git/info/refs?service=git-upload-pack&service=git-receive-pack",
            why="names 2 services")
    refused("POST", "github.com", "/torvalds/linux.git/info/refs?service=git-upload-pack",
            why="not git smart HTTP")
    refused("GET", "github.com", "/me/work.git/git-receive-pack", why="not git smart HTTP")
    refused("POST", "github.com", "/me/work/../../attacker/loot/git-receive-pack",
            why="'.' or '..' segment")
    refused("POST", "github.com", "/me/work/%2e%2e/%2e%2e/attacker/loot/git-receive-pack",
            why="segment")


def test_github_web_writes_are_refused_and_reads_pass_without_token() -> None:
    allowed("GET", "github.com", "/attacker/loot/blob/main/README.md")
    allowed("GET", "github.com", "/me/work")  # no token for web pages
    refused("POST", "github.com", "/session", why="POST /session is neither")
    refused("POST", "github.com", "/attacker/loot/issues", why="neither")
    refused("PUT", "github.com", "/me/work", why="neither")


# --- preset=github: REST ---------------------------------------------------------------


def test_gist_creation_is_refused() -> None:
    d = refused("POST", "api.github.com", "/gists",
                why="preset=github lets writes reach me/work, upstream/work only (REPO_URL); "
                    "POST /gists is a write elsewhere")
    assert d.where == where_of("api.github.com")
    refused("PATCH", "api.github.com", "/gists/abc", why="write elsewhere")


def test_issue_comment_on_another_repository_is_refused() -> None:
    refused("POST", "api.github.com", "/repos/attacker/loot/issues/1/comments",
            why="POST /repos/attacker/loot/issues/1/comments is a write elsewhere")
    refused("POST", "api.github.com", "/repos/me/work2/issues", why="write elsewhere")
    refused("POST", "api.github.com", "/repos/%6de/work/issues", why="write elsewhere")
    refused("POST", "api.github.com", "/repos/me/work/../../attacker/loot/issues",
            why="segment")
    refused("POST", "api.github.com", "/repositories/123/issues", why="write elsewhere")


@pytest.mark.parametrize("path", ["/user", "/user/repos", "/orgs/acme/repos", "/user/keys",
                                  "/markdown", "/repos/attacker/loot/forks"])
def test_user_org_and_other_writes_are_refused(path: str) -> None:
    refused("POST", "api.github.com", path, why="write elsewhere")


def test_writes_to_the_configured_repository_carry_the_token() -> None:
    for method, path in [("POST", "/repos/me/work/issues/1/comments"),
                         ("POST", "/repos/Me/Work/pulls"),
                         ("PATCH", "/repos/upstream/work/pulls/3"),
                         ("PUT", "/repos/me/work/pulls/3/merge"),
                         ("DELETE", "/repos/me/work/git/refs/heads/tmp"),
                         ("POST", "/repos/me/work/issues?x=1")]:
        d = allowed(method, "api.github.com", path, CREDENTIAL_GITHUB_API)
        assert "me/work" in d.rule
    allowed("POST", "uploads.github.com", "/repos/me/work/releases/1/assets?name=a.tgz",
            CREDENTIAL_GITHUB_API)
    refused("POST", "uploads.github.com", "/repos/attacker/loot/releases/1/assets?name=a",
            why="write elsewhere")


@pytest.mark.parametrize(
    ("method", "path"),
    [("PATCH", "/repos/me/work"), ("DELETE", "/repos/me/work"), ("PATCH", "/repos/me/work/"),
     ("POST", "/repos/me/work/hooks"), ("POST", "/repos/me/work/keys"),
     ("PUT", "/repos/me/work/collaborators/attacker"), ("POST", "/repos/me/work/transfer"),
     ("PUT", "/repos/me/work/actions/secrets/X"), ("POST", "/repos/me/work/actions/variables"),
     ("POST", "/repos/me/work/actions/runners/registration-token"),
     ("PUT", "/repos/me/work/branches/main/protection"),
     ("DELETE", "/repos/me/work/branches/main/protection/required_signatures"),
     ("PUT", "/repos/me/work/environments/prod")],
)
def test_repository_administration_is_refused_even_on_the_configured_one(
    method: str, path: str
) -> None:
    refused(method, "api.github.com", path, why="keeps repository administration")


def test_api_reads_anywhere_token_only_for_the_configured_repository() -> None:
    allowed("GET", "api.github.com", "/repos/attacker/loot/contents/x")
    allowed("GET", "api.github.com", "/user")
    allowed("HEAD", "api.github.com", "/repos/me/work", CREDENTIAL_GITHUB_API)
    allowed("GET", "api.github.com", "/repos/upstream/work/pulls", CREDENTIAL_GITHUB_API)
    allowed("OPTIONS", "api.github.com", "/gists")


def test_other_github_hosts_are_read_only() -> None:
    allowed("GET", "codeload.github.com", "/me/work/tar.gz/main")
    allowed("GET", "raw.githubusercontent.com", "/attacker/loot/main/x")
    allowed("GET", "objects.githubusercontent.com", "/x")
    allowed("GET", "ghcr.io", "/v2/me/img/manifests/latest")
    refused("PUT", "ghcr.io", "/v2/attacker/img/manifests/latest", why="allows only reads")
    refused("POST", "codeload.github.com", "/x", why="allows only reads")
    refused("PUT", "raw.githubusercontent.com", "/x", why="write")
    allowed("GET", "npm.pkg.github.com", "/@me%2fpkg", CREDENTIAL_GITHUB_API)
    refused("PUT", "npm.pkg.github.com", "/@me%2fpkg", why="allows only reads")


def test_credentials_go_over_https_only() -> None:
    refused("POST", "github.com", "/me/work.git/git-receive-pack", scheme="http", port=80,
            why="over HTTPS only")
    refused("POST", "api.anthropic.com", "/v1/messages", scheme="http", port=80, why="HTTPS only")
    # what needs no token may still go by plain HTTP
    allowed("GET", "github.com", "/attacker/loot.git/info/refs", scheme="http", port=80)


def test_presets_give_credentials_on_their_own_hosts_only() -> None:
    # *.example.org preset=github: GitHub's rules, never GitHub's token
    allowed("GET", "x.example.org", "/me/work.git/info/refs?service=git-upload-pack")
    refused("POST", "x.example.org", "/me/work.git/git-receive-pack", why="allows only reads")
    allowed("POST", "evil.example", "/v1/messages")  # preset=anthropic, no token


# --- preset=github: GraphQL ----------------------------------------------------------


def gql(query: str, variables: Any = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"query": query, **extra}
    if variables is not None:
        body["variables"] = variables
    return json.dumps(body).encode()


CREATE_PR = ("mutation PullRequestCreate($input: CreatePullRequestInput!) "
             "{ createPullRequest(input: $input) { pullRequest { id url } } }")


def graphql(body: bytes | None) -> Decision:
    return check("POST", "api.github.com", "/graphql", body=body)


def test_graphql_query_is_allowed_with_the_token() -> None:
    for q in ["query { viewer { login } }", "{ viewer { login } }",
              'query Q($n: String = "mutation {") { repository(owner: "a", name: $n) { id } }',
              "# mutation { addComment }\n{ viewer { login } }",
              "query mutation { viewer { login } } fragment F on User { login }"]:
        d = graphql(gql(q))
        assert d.allowed and d.credential == CREDENTIAL_GITHUB_API, (q, d)


def test_graphql_mutation_on_another_target_is_refused() -> None:
    d = graphql(gql("mutation($s: ID!, $b: String!) { addComment(input: {subjectId: $s, body: $b})"
                    " { clientMutationId } }", {"s": "I_kwDOattacker", "b": "secret"}))
    assert not d.allowed
    assert "GraphQL mutations only on the configured repository" in d.reason
    assert d.where == where_of("api.github.com")


def test_graphql_mutation_on_the_configured_repository_is_allowed() -> None:
    d = graphql(gql(CREATE_PR, {"input": {"repositoryId": "R_kgDOwork", "baseRefName": "main",
                                          "headRefName": "x", "title": "t", "body": "b"}}))
    assert d.allowed and d.credential == CREDENTIAL_GITHUB_API, d
    d = graphql(gql("mutation($r: ID!, $t: String!) { a: createIssue(input: {repositoryId: $r, "
                    "title: $t}) { issue { id } } b: createLabel(input: {repositoryId: $r, "
                    'name: "x", color: "fff"}) { label { id } } }',
                    {"r": "R_kgDOupstream", "t": "x"}))
    assert d.allowed, d


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (None, "no request body"),
        (b"", "no request body"),
        (b"not json", "does not parse"),
        (b"[]", "not a GraphQL request"),
        (b'{"query": 1}', "not a GraphQL request"),
        (b'{"extensions": {"persistedQuery": {"sha256Hash": "ab"}}}', "not a GraphQL request"),
        (gql(CREATE_PR, "x"), "variables is not an object"),
        (gql(CREATE_PR, {"input": {"repositoryId": "R_kgDOattacker"}}),
         "'R_kgDOattacker' is not the configured repository"),
        (gql(CREATE_PR, {"input": {"repositoryId": "R_kgDOwork"},
                         "x": [{"repositoryId": "R_kgDOattacker"}]}), "not the configured"),
        (gql(CREATE_PR, {"input": {"repositoryId": 5}}), "not the configured"),
        (gql(CREATE_PR, {"input": {"title": "t"}}), "names no repositoryId"),
        (gql(CREATE_PR), "names no repositoryId"),
        # the repository bound in the document, a configured one only as a decoy
        (gql("mutation($r: ID!) { createIssue(input: {repositoryId: $r, title: $r}) { issue { id } } }",
             {"r": "R_kgDOattacker", "d": {"repositoryId": "R_kgDOwork"}}), "not the configured"),
        (gql("mutation($r: ID!) { createIssue(input: {repositoryId: $missing}) { issue { id } } }",
             {"d": {"repositoryId": "R_kgDOwork"}}), "not the configured"),
        (gql('mutation { createIssue(input: {repositoryId: "R_kgDOattacker", title: "x"}) '
             "{ issue { id } } }", {"d": {"repositoryId": "R_kgDOwork"}}),
         "must come from a variable"),
        # a mutation that names its target another way, beside a configured decoy
        (gql("mutation($input: CreateIssueInput!, $s: ID!) { createIssue(input: $input) "
             '{ issue { id } } addComment(input: {subjectId: $s, body: "x"}) { clientMutationId } }',
             {"input": {"repositoryId": "R_kgDOwork"}, "s": "I_attacker"}),
         "mutation addComment does not name its repository"),
        (gql("mutation { createIssue: addComment(input: $i) { clientMutationId } }",
             {"i": {"repositoryId": "R_kgDOwork"}}), "mutation addComment"),
        (gql("mutation { ...F } fragment F on Mutation { addComment(input: $i) { x } }",
             {"i": {"repositoryId": "R_kgDOwork"}}), "does not parse"),
        (gql("mutation { ... on Mutation { addComment(input: $i) { x } } }",
             {"i": {"repositoryId": "R_kgDOwork"}}), "does not parse"),
        (gql("query { viewer { login } } mutation M($i: X!) { updateRepository(input: $i) { x } }",
             {"i": {"repositoryId": "R_kgDOwork"}}), "mutation updateRepository"),
        (gql("subscription { x }"), "subscription"),
        (b'{"query": "mutation($i: X!) { createIssue(input: $i) { x } }", "variables": '
         b'{"i": {"repositoryId": "R_kgDOattacker", "repositoryId": "R_kgDOwork"}}}',
         "a key twice"),
        (gql("mutation { createIssue(input: $ i) { x } }"), "does not parse"),
        (gql("mutation { createIssue(input: $i) { x }"), "does not parse"),
        (gql("mutation { createIssue(input: $i) { x ) }"), "does not parse"),
        (gql("fragment F on X { y }"), "no operation"),
        (gql(""), "no operation"),
        (gql("{ a } garbage"), "does not parse"),
    ],
)
def test_graphql_refusals(body: bytes | None, why: str) -> None:
    d = graphql(body)
    assert not d.allowed, d
    assert why in d.reason, d.reason
    assert "GraphQL mutations only on the configured repository" in d.reason


def test_graphql_by_get() -> None:
    allowed("GET", "api.github.com", "/graphql")
    refused("GET", "api.github.com", "/graphql?query=mutation%20%7Bx%7D", why="by POST only")
    refused("PUT", "api.github.com", "/graphql", body=gql("{ a }"), why="by POST only")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=120).map(lambda q: gql(q)))
def test_graphql_check_never_raises(body: bytes) -> None:
    ok, why = graphql_check(body, REPO_IDS)
    assert isinstance(ok, bool) and why


# --- npm, PyPI, Anthropic ---------------------------------------------------------------


def test_npm_downloads_and_audit_only() -> None:
    allowed("GET", "registry.npmjs.org", "/@types%2fnode")
    allowed("HEAD", "registry.npmjs.org", "/left-pad/-/left-pad-1.3.0.tgz")
    allowed("POST", "registry.npmjs.org", "/-/npm/v1/security/advisories/bulk")
    allowed("POST", "registry.npmjs.org", "/-/npm/v1/security/audits/quick")
    refused("PUT", "registry.npmjs.org", "/leaked-pkg", why="npm publish")
    refused("PUT", "registry.npmjs.org", "/-/user/org.couchdb.user:attacker", why="refused")
    refused("POST", "registry.npmjs.org", "/-/npm/v1/security/advisories/bulkx", why="refused")
    refused("DELETE", "registry.npmjs.org", "/pkg/-rev/1", why="refused")


def test_pypi_downloads_only() -> None:
    allowed("GET", "pypi.org", "/simple/requests/")
    allowed("GET", "files.pythonhosted.org", "/packages/x.whl")
    refused("POST", "pypi.org", "/legacy/", why="downloads (GET, HEAD) only")


def test_anthropic_api_with_the_operators_token() -> None:
    d = allowed("POST", "api.anthropic.com", "/v1/messages?beta=true", CREDENTIAL_ANTHROPIC)
    assert d.rule == "preset=anthropic"
    allowed("GET", "api.anthropic.com", "/api/oauth/profile", CREDENTIAL_ANTHROPIC)
    refused("POST", "api.anthropic.com", "/v1x", why="under /v1/ and /api/ only")
    refused("GET", "api.anthropic.com", "/", why="under /v1/ and /api/ only")


# --- properties and speed --------------------------------------------------------------

GH_HOSTS = st.sampled_from(["github.com", "api.github.com", "uploads.github.com",
                            "codeload.github.com", "raw.githubusercontent.com", "ghcr.io",
                            "npm.pkg.github.com", "Api.GitHub.com"])
SEGMENTS = st.sampled_from(["repos", "me", "work", "work.git", "attacker", "loot", "upstream",
                            "info", "refs", "git-upload-pack", "git-receive-pack", "gists",
                            "graphql", "issues", "..", "%2e%2e", "", "user", "hooks", "lfs"])
QUERIES = st.sampled_from(["", "?service=git-upload-pack", "?service=git-receive-pack", "?x=1"])
METHODS = st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE"])


@settings(max_examples=1500, deadline=None)
@given(METHODS, GH_HOSTS, st.lists(SEGMENTS, max_size=7), QUERIES)
def test_github_preset_writes_and_token_only_where_configured(
    method: str, host: str, segments: list[str], query: str
) -> None:
    path = "/" + "/".join(segments) + query
    d = decide(POLICY, req(method, host, path, body=gql("mutation { x }")), NOW)
    low = path.lower()
    mine = any(f"/{r}/" in low + "/" or f"/{r}.git/" in low for r in REPOS)
    push = low.split("?")[0].endswith("/info/refs") and "receive-pack" in query
    if d.allowed and (method not in READS or push):
        assert mine or "git-upload-pack" in low, (method, host, path, d)
    if d.credential != CREDENTIAL_NONE:
        assert mine or host.lower() == "npm.pkg.github.com", (method, host, path, d)
    if d.allowed and method not in READS:
        assert canonical_path(path)


HOSTNAMES = st.from_regex(r"[a-z0-9.\-]{0,20}\.(com|net|org|example)", fullmatch=True)


@settings(max_examples=500, deadline=None)
@given(METHODS, HOSTNAMES | st.sampled_from(["203.0.113.9", "192.0.2.1", "[2001:db8::1]"]),
       st.text(max_size=30), st.integers(1, 65535), st.none() | HOSTNAMES)
def test_decide_never_raises_and_allows_only_matching_entries(
    method: str, host: str, path: str, port: int, sni: str | None
) -> None:
    d = decide(POLICY, HttpRequest(method, host, path, port=port, sni=sni), NOW)
    assert isinstance(d, Decision) and d.reason
    if d.allowed:
        entries = match_entries(POLICY, host, NOW)
        assert any(port in e.ports for e in entries)
        assert d.where in {e.where for e in entries}


def test_compiled_policy_is_cached_per_policy_object() -> None:
    p = make_policy()
    cp = compiled(p)
    assert compiled(p) is cp and compiled(cp) is cp
    assert decide(cp, req("GET", "pypi.org"), NOW).allowed
    q = make_policy()
    assert compiled(q) is not cp and compiled(q).policy is q


def test_decide_is_fast() -> None:
    reqs = [req("POST", "api.github.com", "/repos/me/work/issues"),
            req("GET", "raw.githubusercontent.com", "/a/b/c"),
            req("POST", "github.com", "/me/work.git/git-receive-pack"),
            req("GET", "evil.example.com"), req("GET", "203.0.113.5", sni=None)]
    start = time.perf_counter()
    for _ in range(2000):
        for r in reqs:
            decide(POLICY, r, NOW)
    per = (time.perf_counter() - start) / 10_000
    assert per < 200e-6, f"{per * 1e6:.1f} µs a decision"


def test_policy_json_round_trip_with_repo_ids() -> None:
    back = ProxyPolicy.from_json(POLICY.to_json())
    assert back == POLICY and back.github_repo_ids == REPO_IDS
    bad = json.loads(POLICY.to_json())
    bad["github_repo_ids"] = ["x y"]
    with pytest.raises(ValueError, match="github_repo_ids"):
        ProxyPolicy.from_json(json.dumps(bad))
    old = json.loads(POLICY.to_json())
    del old["github_repo_ids"]
    assert ProxyPolicy.from_json(json.dumps(old)).github_repo_ids == ()
