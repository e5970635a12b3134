"""The allowlist parser: entry kinds, ports, validation, errors, matching, @github."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from codetainer.network import github_meta
from codetainer.network.allowlist import (
    Allowlist,
    AllowlistError,
    Entry,
    EntryKind,
    load_allowlist,
    parse_entry,
    parse_env,
    parse_text,
    policy_entry,
)
from codetainer.network.model import DEFAULT_PORTS
from codetainer.proxy.model import PRESETS, PolicyEntry, Rules
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]


def one(text: str) -> Entry:
    return parse_entry(text, "t.conf", 1)


def errors_of(text: str, source: str = "domains.conf") -> list[str]:
    with pytest.raises(AllowlistError) as info:
        parse_text(text, source)
    return str(info.value).split("\n")


# --- entry kinds -------------------------------------------------------------


def test_exact_host_is_lowercased_and_trailing_dot_stripped() -> None:
    e = one("API.GitHub.com.")
    assert (e.kind, e.value, e.ports) == (EntryKind.HOST, "api.github.com", DEFAULT_PORTS)


def test_wildcard_keeps_star_and_exposes_domain() -> None:
    e = one("*.GitHubUserContent.com")
    assert e.kind is EntryKind.WILDCARD
    assert e.value == "*.githubusercontent.com"
    assert e.domain == "githubusercontent.com"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("203.0.113.7", "203.0.113.7/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8::1", "2001:db8::1/128"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("fd00::/16", "fd00::/16"),
    ],
)
def test_cidr_entries(text: str, value: str) -> None:
    e = one(text)
    assert (e.kind, e.value) == (EntryKind.CIDR, value)
    assert e.network == ipaddress.ip_network(value)


def test_github_entry() -> None:
    assert one("@github").kind is EntryKind.GITHUB
    assert one("@github:443").ports == (443,)


@pytest.mark.parametrize(
    ("text", "value", "ports"),
    [
        ("registry.npmjs.org:443", "registry.npmjs.org", (443,)),
        ("*.x.com:8443,443", "*.x.com", (443, 8443)),
        ("*.x.com:443,443", "*.x.com", (443,)),
        ("[2001:db8::/32]:443", "2001:db8::/32", (443,)),
        ("[2001:db8::1]", "2001:db8::1/128", DEFAULT_PORTS),
        ("203.0.113.0/24:22", "203.0.113.0/24", (22,)),
    ],
)
def test_ports(text: str, value: str, ports: tuple[int, ...]) -> None:
    e = one(text)
    assert (e.value, e.ports) == (value, ports)


# --- rejection ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("*", "alone"),
        ("*.com", "top-level domain"),
        ("*.*.x.com", "leftmost"),
        ("a*.x.com", "leftmost"),
        ("x.*.com", "leftmost"),
        ("0.0.0.0/0", "broader than /8"),
        ("10.0.0.0/7", "broader than /8"),
        ("::/0", "broader than /16"),
        ("2000::/3", "broader than /16"),
        ("10.1.0.0/8", "host bits set: did you mean 10.0.0.0/8"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("evil.com}", "'}'"),
        ("{evil.com", "'{'"),
        ('"evil".com', "'\"'"),
        ("'evil'.com", "\"'\""),
        ("a/b.com", "not an IP"),
        ("a;b.com", "';'"),
        ("a\\b.com", "'\\\\'"),
        ("x.com\x00", "control byte"),
        ("x\x1b.com", "control byte"),
        ("x\x7f.com", "control byte"),
        ("x\u00e9.com", "punycode"),
        ("a b.com", "whitespace"),
        ("-a.com", "inner '-'"),
        ("a-.com", "inner '-'"),
        ("a..com", "empty label"),
        ("a_b.com", "'_'"),
        ("localhost", "single label"),
        ("1.2.3.999", "not an IP"),
        ("a.b.123", "looks like an address"),
        ("x.com:0", "out of range"),
        ("x.com:65536", "out of range"),
        ("x.com:", "bad port list"),
        ("x.com:443,", "bad port list"),
        ("x.com:http", "bad port list"),
        ("x.com:" + ",".join(str(p) for p in range(1, 18)), "at most 16"),
        ("[2001:db8::/32", "without ']'"),
        ("[2001:db8::/32]443", "':PORTS'"),
        ("@gitlab", "only @github"),
        ("a" * 64 + ".com", "label of 64"),
        (".".join(["a" * 60] * 5), "at most 253"),
    ],
)
def test_rejected_entries(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        one(text)
    assert why in str(info.value), str(info.value)


def test_label_and_name_limits_accept_the_maximum() -> None:
    assert one("a" * 63 + ".com").value == "a" * 63 + ".com"
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    assert len(name) == 253
    assert one(name).value == name


def test_every_bad_line_is_reported_with_file_and_line() -> None:
    text = "\n".join(
        [
            "# header",
            "api.github.com   # trailing comment",
            "",
            "evil.com}",
            "ok.example.com",
            "bad\x0bname.com",  # vertical tab: must not split the line
            "*",
            "0.0.0.0/0",
            "a" * 300 + ".com",
            'x.com" ; server=/#/1.2.3.4',
        ]
    )
    lines = errors_of(text)
    assert [ln.split(": ", 1)[0] for ln in lines] == [
        "domains.conf:4",
        "domains.conf:6",
        "domains.conf:7",
        "domains.conf:8",
        "domains.conf:9",
        "domains.conf:10",
    ]
    assert "'*' alone" in lines[2]
    assert "label of 300 characters" in lines[4] or "characters long" in lines[4]


def test_comments_blank_lines_and_crlf() -> None:
    entries = parse_text("# c\r\n\r\n  a.com  # x\r\n\t*.b.com\t\r\n", "f")
    assert [(e.value, e.lineno) for e in entries] == [("a.com", 3), ("*.b.com", 4)]


def test_hostile_text_is_escaped_in_errors() -> None:
    (line,) = errors_of("evil\x1b[31m.com\n")
    assert "\x1b" not in line
    assert "\\x1b" in line


def test_env_entries_and_port_continuation() -> None:
    entries = parse_env("a.com:443,8443, b.com ,[2001:db8::1]:22,*.x.org,,")
    assert [(e.value, e.ports, e.source, e.lineno) for e in entries] == [
        ("a.com", (443, 8443), "CODETAINER_ALLOW", 1),
        ("b.com", DEFAULT_PORTS, "CODETAINER_ALLOW", 2),
        ("2001:db8::1/128", (22,), "CODETAINER_ALLOW", 3),
        ("*.x.org", DEFAULT_PORTS, "CODETAINER_ALLOW", 4),
    ]


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(AllowlistError) as info:
        parse_env("good.com,evil}.com,*")
    assert str(info.value).split("\n") == [
        "CODETAINER_ALLOW:2: character '}' is not allowed in an allowlist entry",
        "CODETAINER_ALLOW:3: '*' alone would allow everything",
    ]


def test_load_collects_file_and_env_errors(tmp_path: Path) -> None:
    f = tmp_path / "domains.conf"
    f.write_bytes(b"ok.com\nbad\xff.com\n")
    with pytest.raises(AllowlistError) as info:
        load_allowlist(f, "also}bad")
    lines = str(info.value).split("\n")
    assert lines[0].startswith(f"{f}:2: non-ASCII")
    assert lines[1].startswith("CODETAINER_ALLOW:1: ")


def test_load_missing_file_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(AllowlistError, match="cannot read the allowlist"):
        load_allowlist(tmp_path / "nope.conf")


def test_shipped_domains_conf_is_valid() -> None:
    al = load_allowlist(REPO / "network" / "domains.conf")
    assert {"api.anthropic.com", "github.com", "registry.npmjs.org", "pypi.org"} <= set(al.names)
    assert "githubusercontent.com" in al.wildcards
    assert all(e.source.endswith("domains.conf") and e.lineno > 0 for e in al.entries)


def test_shipped_domains_conf_uses_presets_and_limits() -> None:
    al = load_allowlist(REPO / "network" / "domains.conf")
    preset = {e.value: e.rules.preset for e in al.entries if e.rules and e.rules.preset}
    assert preset["api.anthropic.com"] == "anthropic"
    for name in ("github.com", "api.github.com", "uploads.github.com", "codeload.github.com",
                 "*.githubusercontent.com", "ghcr.io", "npm.pkg.github.com"):
        assert preset[name] == "github", name
    assert preset["registry.npmjs.org"] == "npm"
    assert preset["pypi.org"] == preset["files.pythonhosted.org"] == "pypi"
    for e in al.entries:  # nothing shipped is open to every method
        assert e.rules is not None, f"{e.where}: {e} has no rules"
        if e.rules.preset is None:
            assert e.rules.methods == ("GET", "HEAD"), e
    # write APIs for any app with any token: not shipped (the reason is in the file)
    assert al.match("api.fly.io") is None and al.match("api.machines.dev") is None


# --- rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rules"),
    [
        ("api.github.com preset=github", Rules(preset="github")),
        ("x.com:443 methods=GET,HEAD paths=/api/,/static/",
         Rules(("GET", "HEAD"), ("/api/", "/static/"))),
        ("x.com\tmethods=GET \t paths=/a", Rules(("GET",), ("/a",))),
        ("x.com paths=/b,/a,/b methods=HEAD,GET,HEAD", Rules(("HEAD", "GET"), ("/b", "/a"))),
        ("x.com preset=anthropic paths=/v1/", Rules(None, ("/v1/",), "anthropic")),
        ("*.x.com:8443 methods=PROPFIND", Rules(("PROPFIND",))),
        ("203.0.113.0/24:80 methods=GET", Rules(("GET",))),
        ("[2001:db8::/32]:443 preset=npm", Rules(preset="npm")),
        ("x.com paths=/a%2Fb/;x=1/~u/", Rules(None, ("/a%2Fb/;x=1/~u/",))),
        ("X.COM paths=/CaseKept/", Rules(None, ("/CaseKept/",))),
    ],
)
def test_rule_part(text: str, rules: Rules) -> None:
    e = one(text)
    assert e.rules == rules
    assert parse_entry(str(e), e.source, e.lineno) == e


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses(preset: str) -> None:
    assert one(f"x.com preset={preset}").rules == Rules(preset=preset)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("x.com methods", "not a rule: whitespace separates"),
        ("a.com b.com", "not a rule"),
        ("x.com method=GET", "unknown rule 'method'"),
        ("x.com Preset=github", "unknown rule 'Preset'"),
        ("x.com =GET", "unknown rule ''"),
        ("x.com preset=gitlab", "unknown preset 'gitlab': one of github, npm"),
        ("x.com preset=GitHub", "unknown preset"),
        ("x.com preset=github preset=npm", "preset= given twice"),
        ("x.com methods=GET methods=POST", "given twice: list every value in one rule "
                                           "(methods=GET,POST)"),
        ("x.com methods=get", "upper case (GET)"),
        ("x.com methods=G3T", "bad method"),
        ("x.com methods=" + "A" * 17, "bad method"),
        ("x.com methods=", "empty value"),
        ("x.com methods=GET,", "empty value"),
        ("x.com paths=api/", "must start with '/'"),
        ("x.com paths=/a/../b", "'..' segment"),
        ("x.com paths=/a/./b", "'.' or '..' segment"),
        ("x.com paths=/a/%2e%2E/b", "'.' or '..' segment"),
        ("x.com paths=/a?b", "bad path prefix"),
        ("x.com paths=/a#b", "bad path prefix"),  # not a comment here: parse_entry has no comments
        ("x.com paths=/" + "a" * 201, "bad path prefix"),
        ("x.com paths=" + ",".join(f"/{i}" for i in range(33)), "at most 32"),
        ("x.com paths=/a\x00", "control byte"),
        ("x.com paths=/\u00e9", "non-ASCII"),
        ("@github preset=github", "@github takes no rules"),
        ("@github:443 methods=GET", "@github takes no rules"),
        ("evil}.com methods=GET", "'}'"),
        ("x.com\x0bmethods=GET", "whitespace inside an entry"),
    ],
)
def test_rejected_rules(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        one(text)
    assert why in str(info.value), str(info.value)


def test_bad_rule_lines_fail_with_file_and_line() -> None:
    lines = errors_of("ok.com preset=npm\nx.com methods=get\n# c\ny.com preset=nope # c\n")
    assert [ln.split(": ", 1)[0] for ln in lines] == ["domains.conf:2", "domains.conf:4"]
    assert "unknown preset 'nope'" in lines[1]


def test_rules_survive_comments_and_carry_to_the_policy() -> None:
    (e,) = parse_text("  api.github.com:443  methods=POST  paths=/gists  # a grant\n", "f")
    assert str(e) == "api.github.com:443 methods=POST paths=/gists"
    pe = policy_entry(e, 12.5)
    assert pe == PolicyEntry("host", "api.github.com", (443,), "f:1",
                             Rules(("POST",), ("/gists",)), 12.5)
    assert PolicyEntry.from_dict(pe.as_dict()) == pe
    (g,) = parse_text("@github\n", "f")
    assert policy_entry(g).rules is None and policy_entry(g).kind == "github"


def test_codetainer_allow_target_with_rules() -> None:
    # ``codetainer allow TARGET`` (network/ops.py) parses its target with parse_entry
    e = parse_entry("api.github.com methods=POST paths=/gists", "codetainer allow", 0)
    assert e.rules == Rules(("POST",), ("/gists",)) and e.where == "codetainer allow:0"
    assert str(e) == "api.github.com methods=POST paths=/gists"


@pytest.mark.parametrize(
    "rules",
    [
        Rules(),  # an empty rule part is rules=None
        Rules(("GET", "GET")),
        Rules(("get",)),
        Rules(None, ("nope",)),
        Rules(None, ("/a/../b",)),
        Rules(preset="gitlab"),
        Rules((), None),
        Rules(["GET"]),  # type: ignore[arg-type]
    ],
)
def test_entry_with_unvalidated_rules_cannot_be_made(rules: Rules) -> None:
    with pytest.raises(ValueError, match="unvalidated allowlist entry"):
        Entry(EntryKind.HOST, "x.com", DEFAULT_PORTS, "f", 1, rules)


def test_entry_rules_revalidated_on_github_entry() -> None:
    with pytest.raises(ValueError, match="unvalidated allowlist entry"):
        Entry(EntryKind.GITHUB, "@github", DEFAULT_PORTS, "f", 1, Rules(preset="github"))
    assert Entry(EntryKind.CIDR, "203.0.113.0/24", (443,), "f", 1, Rules(("GET",))).rules


def test_env_with_rules_splits_on_semicolons_and_newlines() -> None:
    entries = parse_env("a.com methods=GET,HEAD; b.com:443,8443 ;\n\n*.c.org preset=npm;;")
    assert [(str(e), e.lineno) for e in entries] == [
        ("a.com methods=GET,HEAD", 1),
        ("b.com:443,8443", 2),
        ("*.c.org preset=npm", 3),
    ]
    assert [str(e) for e in parse_env("a.com:443,8443\nb.com")] == ["a.com:443,8443", "b.com"]
    # a single entry with a rule and no comma needs no separator at all
    assert [str(e) for e in parse_env("api.github.com preset=github")] == [
        "api.github.com preset=github"]


def test_env_rules_with_commas_need_semicolons() -> None:
    with pytest.raises(AllowlistError) as info:
        parse_env("a.com methods=GET,HEAD,b.com")
    assert str(info.value).startswith("CODETAINER_ALLOW:1: entries with rules contain commas")
    with pytest.raises(AllowlistError) as info:
        parse_env("ok.com; x.com preset=nope; y}.com")
    assert [ln.split(": ", 1)[0] for ln in str(info.value).split("\n")] == [
        "CODETAINER_ALLOW:2", "CODETAINER_ALLOW:3"]


RULE_KEYS = st.sampled_from(["methods", "paths", "preset"])
METHODS = st.lists(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PROPFIND"]),
                   min_size=1, max_size=4, unique=True)
PATHS = st.lists(st.from_regex(r"/[A-Za-z0-9_~%-]{0,8}(/[A-Za-z0-9_~%-]{1,8}){0,3}/?", fullmatch=True),
                 min_size=1, max_size=4, unique=True)
HOSTS = st.sampled_from(["x.com", "*.x.com:443", "203.0.113.0/24:80,443", "[2001:db8::/32]:443",
                         "api.github.com:443,8443"])


@settings(max_examples=300, deadline=None)
@given(HOSTS, st.none() | METHODS, st.none() | PATHS, st.none() | st.sampled_from(PRESETS))
def test_round_trip_with_rules(
    host: str, methods: list[str] | None, paths: list[str] | None, preset: str | None
) -> None:
    words = [f"preset={preset}"] if preset else []
    words += [f"methods={','.join(methods)}"] if methods else []
    words += [f"paths={','.join(paths)}"] if paths else []
    e = parse_entry(" ".join([host, *words]), "f", 3)
    assert (e.rules is None) == (not words)
    if e.rules is not None:
        assert e.rules.methods == (tuple(methods) if methods else None)
        assert e.rules.paths == (tuple(paths) if paths else None)
        assert e.rules.preset == preset
    assert parse_entry(str(e), "f", 3) == e
    assert PolicyEntry.from_dict(policy_entry(e).as_dict()) == policy_entry(e)


RULE_ALPHABET = st.sampled_from([*"abGETHOS=,/.;%#pm \t\x00\u00e9x-", "methods=", "paths=",
                                 "preset=", "github"])


@settings(max_examples=400, deadline=None)
@given(st.lists(RULE_ALPHABET, max_size=30).map("".join))
def test_rule_parser_never_crashes(tail: str) -> None:
    try:
        entries = parse_text("x.com " + tail, "r.conf")
    except AllowlistError as exc:
        assert all(ln.startswith("r.conf:1: ") for ln in str(exc).split("\n"))
        return
    for e in entries:
        assert parse_entry(str(e), e.source, e.lineno) == e


# --- matching ----------------------------------------------------------------


def allowlist(text: str) -> Allowlist:
    return Allowlist(tuple(parse_text(text, "d.conf")))


def test_match_exact_beats_wildcard_and_exact_does_not_cover_subdomains() -> None:
    al = allowlist("*.github.com:22\napi.github.com:443\nx.org\n*.y.x.org\n")
    hit = al.match("API.github.com.")
    assert hit is not None and hit.lineno == 2
    hit = al.match("a.api.github.com")
    assert hit is not None and hit.lineno == 1
    assert al.match("github.com") is None
    assert al.match("sub.x.org") is None
    assert al.match("y.x.org") is None
    hit = al.match("z.y.x.org")
    assert hit is not None and hit.value == "*.y.x.org"
    assert al.names == ("api.github.com", "x.org")
    assert al.wildcards == ("github.com", "y.x.org")


def test_match_ip_most_specific_network_then_github() -> None:
    al = allowlist("10.0.0.0/8\n10.1.0.0/16:22\n@github\n")
    hit = al.match_ip("10.1.2.3")
    assert hit is not None and hit.ports == (22,)
    hit = al.match_ip("10.2.0.1")
    assert hit is not None and hit.value == "10.0.0.0/8"
    gh = [ipaddress.ip_network("140.82.112.0/20")]
    assert al.match_ip("140.82.112.5") is None
    hit = al.match_ip("140.82.112.5", gh)
    assert hit is not None and hit.kind is EntryKind.GITHUB
    assert al.match_ip("not-an-ip") is None
    assert al.github and al.cidrs[0] == ipaddress.ip_network("10.0.0.0/8")


def test_with_entries_and_ports_for() -> None:
    al = allowlist("a.com:443\n")
    more = al.with_entries([one("a.com:8443")])
    assert more.ports_for(more.entries[0]) == (443, 8443)
    assert al.entries == allowlist("a.com:443\n").entries


# --- properties --------------------------------------------------------------

ENTRY_ALPHABET = st.sampled_from(list("abcz09-.*:/[],@#{}\"' ;\\\n\t\x00\x1b\x7f\u00e9_xX"))


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=ENTRY_ALPHABET, max_size=80) | st.text(max_size=80))
def test_parser_never_crashes(text: str) -> None:
    try:
        entries = parse_text(text, "p.conf")
    except AllowlistError as exc:
        for line in str(exc).split("\n"):
            assert line.startswith("p.conf:")
            assert "\n" not in line and "\x00" not in line
        return
    for e in entries:
        assert isinstance(e, Entry)
        assert e.lineno >= 1
        # what survives contains only the characters the generators expect
        assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789-.*:/@" for c in e.value), e


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_env_parser_never_crashes(text: str) -> None:
    try:
        parse_env(text)
    except AllowlistError as exc:
        assert all(ln.startswith("CODETAINER_ALLOW:") for ln in str(exc).split("\n"))


# --- @github meta --------------------------------------------------------------

META = {
    "web": ["140.82.112.0/20", "192.30.252.0/22", "2a0a:a440::/29"],
    "api": ["140.82.112.0/20", "143.55.64.0/20"],
    "git": ["140.82.114.0/24"],
    "actions": ["4.0.0.0/6"],  # ignored: not one of the keys we take
}


class _Meta(BaseHTTPRequestHandler):
    body: bytes = b""
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def meta_server() -> Iterator[tuple[str, type[_Meta]]]:
    handler = type("H", (_Meta,), {"body": json.dumps(META).encode(), "status": 200})
    srv = HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}/meta", handler
    srv.shutdown()
    srv.server_close()
    t.join()


async def test_github_meta_fresh_then_cache_then_none(
    tmp_path: Path, meta_server: tuple[str, type[_Meta]]
) -> None:
    url, handler = meta_server
    cache = tmp_path / "gh" / "meta.json"
    fresh = await github_meta.load_github_ranges(url, cache, timeout=2)
    assert fresh.source is github_meta.MetaSource.FRESH
    assert ipaddress.ip_network("140.82.112.0/20") in fresh.networks
    assert ipaddress.ip_network("140.82.114.0/24") not in fresh.networks  # collapsed
    assert not any(n.prefixlen < 8 for n in fresh.networks)
    assert json.loads(cache.read_text())["networks"]
    assert not list(cache.parent.glob(".meta.json.*"))  # no temporary file left

    # a hostile document (a /0) is refused as a whole; the last good copy is used
    handler.body = json.dumps({"web": ["0.0.0.0/0"]}).encode()
    cached = await github_meta.load_github_ranges(url, cache, timeout=2)
    assert cached.source is github_meta.MetaSource.CACHE
    assert cached.networks == fresh.networks
    assert cached.error is not None and "broader than /8" in cached.error

    handler.status = 500
    cached = await github_meta.load_github_ranges(url, cache, timeout=2)
    assert cached.source is github_meta.MetaSource.CACHE

    cache.unlink()
    none = await github_meta.load_github_ranges(url, cache, timeout=2)
    assert none.source is github_meta.MetaSource.NONE and none.networks == ()


async def test_github_meta_timeout_is_short(tmp_path: Path) -> None:
    import socket

    # a listener that accepts and never answers
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/meta"
    loop = asyncio.get_running_loop()
    start = loop.time()
    res = await github_meta.load_github_ranges(url, tmp_path / "c.json", timeout=0.3)
    assert loop.time() - start < 2
    assert res.source is github_meta.MetaSource.NONE and res.error
    sock.close()


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (b"nope", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"web": "1.2.3.0/24"}).encode(), "not a list"),
        (json.dumps({"web": ["1.2.3.0/33"]}).encode(), "not a network"),
        (json.dumps({"web": ["2000::/3"]}).encode(), "broader than /16"),
        (json.dumps({"web": []}).encode(), "no networks"),
        (
            json.dumps({"web": [f"10.{i // 256}.{i % 256}.0/25" for i in range(0, 12, 2)]}).encode(),
            "at most 5",
        ),
    ],
)
def test_github_meta_validation(doc: bytes, why: str) -> None:
    with pytest.raises(github_meta.GithubMetaError, match=why):
        github_meta.parse_meta(doc, max_count=5)


def test_github_meta_rejects_non_http_url(tmp_path: Path) -> None:
    res = asyncio.run(github_meta.load_github_ranges("file:///etc/passwd", tmp_path / "c"))
    assert res.source is github_meta.MetaSource.NONE
    assert res.error is not None and "http" in res.error
