"""The allowlist: ``network/domains.conf`` plus ``CODETAINER_ALLOW``.

One entry a line, ``#`` starts a comment (also after an entry), blank lines are
ignored. Entry kinds::

    api.github.com                 exact host name (its subdomains are NOT allowed)
    *.githubusercontent.com        any subdomain, not the apex itself
    203.0.113.0/24, 2001:db8::/32  IPv4/IPv6 network (a bare address means /32 or /128)
    @github                        GitHub's published meta ranges

Each may carry ports: ``host:443``, ``*.x.com:443,8443``, ``[2001:db8::/32]:443``,
``203.0.113.0/24:22``; without them ``model.DEFAULT_PORTS`` apply.

After the entry, an optional rule part for the policy proxy, whitespace separated,
each key at most once::

    api.github.com preset=github           a named rule set (proxy.model.PRESETS)
    example.com:443 methods=GET,HEAD paths=/api/,/static/

``methods`` are upper-case HTTP methods; ``paths`` are prefixes of the request path
(plain string prefixes: end one with ``/`` to mean a directory). A preset with
``methods``/``paths`` allows the intersection: a request must pass both. No rule part:
every method and path (an entry opened on purpose). ``@github`` takes no rules (they
would apply only to requests made to a bare GitHub address, not to github.com, which
is what a reader would take them to mean); CIDR entries may carry rules, since the
proxy decides requests made to a bare address by those entries.

This module is the only gate between operator text and the generated DNS and
firewall configs, so it is strict: every problem is reported as ``source:line: why``,
all problems are collected, and one :class:`AllowlistError` lists them. A network
with host bits set is an error (``10.1.0.0/8``), not silently normalised: the
operator probably meant something else and should say so.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from codetainer.network.model import DEFAULT_PORTS, IPAddress, IPNetwork
from codetainer.proxy.model import METHOD, PATH_PREFIX, PRESETS, PolicyEntry, Rules

ENV_SOURCE = "CODETAINER_ALLOW"
MAX_NAME = 253
MAX_LABEL = 63
MAX_LINE = 1024
MAX_PORTS = 16
MIN_PREFIX = {4: 8, 6: 16}
MAX_RULE_VALUES = 32
RULE_KEYS = ("preset", "methods", "paths")
RULE_HELP = "preset=NAME, methods=GET,HEAD, paths=/a/,/b"

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_PORTS = re.compile(r"[0-9]{1,5}(?:,[0-9]{1,5})*\Z")
_IP_CHARS = re.compile(r"[0-9a-f.:/]+\Z")
#: only spaces and tabs separate an entry from its rules: any other whitespace byte stays
#: inside its word and is rejected there
_WORDS = re.compile(r"[ \t]+")


class EntryKind(enum.StrEnum):
    HOST = "host"
    WILDCARD = "wildcard"
    CIDR = "cidr"
    GITHUB = "github"


@dataclass(frozen=True)
class Problem:
    source: str
    lineno: int
    why: str

    def __str__(self) -> str:
        return f"{self.source}:{self.lineno}: {self.why}"


class AllowlistError(ValueError):
    """One or more invalid allowlist lines; ``str()`` has one ``file:line: why`` a line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Entry:
    kind: EntryKind
    #: normalised text: ``api.github.com``, ``*.githubusercontent.com``,
    #: ``203.0.113.0/24``, ``@github``
    value: str
    ports: tuple[int, ...] = DEFAULT_PORTS
    source: str = ""
    lineno: int = 0
    #: the rule part (methods, paths, preset) the proxy applies; None: everything
    rules: Rules | None = None

    def __post_init__(self) -> None:
        # Every Entry is a validated one, however it was made: generated configs and the
        # firewall take Entries only, so nothing unvalidated can reach them.
        try:
            ok = _revalidate(self)
        except ValueError as exc:
            raise ValueError(f"unvalidated allowlist entry {show(self.value)}: {exc}") from None
        if not ok:
            raise ValueError(f"unvalidated allowlist entry {show(self.value)}: not in normal form")

    @property
    def domain(self) -> str:
        """The host name, or for a wildcard the domain under which it allows names."""
        if self.kind is EntryKind.WILDCARD:
            return self.value[2:]
        return self.value

    @property
    def network(self) -> IPNetwork:
        if self.kind is not EntryKind.CIDR:
            raise TypeError(f"{self.where}: {self.value} is not a network entry")
        return ipaddress.ip_network(self.value)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.lineno}"

    def __str__(self) -> str:
        ports = "" if self.ports == DEFAULT_PORTS else ":" + ",".join(map(str, self.ports))
        value = f"[{self.value}]" if ports and ":" in self.value else self.value
        return value + ports + (f" {self.rules}" if self.rules is not None else "")


@dataclass(frozen=True)
class Allowlist:
    entries: tuple[Entry, ...] = ()
    _exact: dict[str, Entry] = field(init=False, repr=False, compare=False, hash=False)
    _wild: dict[str, Entry] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        exact: dict[str, Entry] = {}
        wild: dict[str, Entry] = {}
        for e in self.entries:
            if e.kind is EntryKind.HOST:
                exact.setdefault(e.value, e)
            elif e.kind is EntryKind.WILDCARD:
                wild.setdefault(e.domain, e)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_wild", wild)

    @property
    def names(self) -> tuple[str, ...]:
        """Exact host names, in file order, without duplicates."""
        return tuple(self._exact)

    @property
    def wildcards(self) -> tuple[str, ...]:
        """Domains of the wildcard entries (``githubusercontent.com`` for ``*.githu…``)."""
        return tuple(self._wild)

    @property
    def cidrs(self) -> tuple[IPNetwork, ...]:
        return tuple(e.network for e in self.entries if e.kind is EntryKind.CIDR)

    @property
    def github(self) -> bool:
        return any(e.kind is EntryKind.GITHUB for e in self.entries)

    def with_entries(self, extra: Iterable[Entry]) -> Allowlist:
        """A new allowlist with ``extra`` appended (temporary grants)."""
        return Allowlist(self.entries + tuple(extra))

    def ports_for(self, entry: Entry) -> tuple[int, ...]:
        """Union of the ports of every entry with the same kind and value."""
        ports = {p for e in self.entries if e.kind is entry.kind and e.value == entry.value
                 for p in e.ports}
        return tuple(sorted(ports))

    def covering_wildcard(self, host: str) -> Entry | None:
        """The most specific wildcard entry that allows ``host`` (a strict subdomain)."""
        labels = host.split(".")
        for i in range(1, len(labels) - 1):
            hit = self._wild.get(".".join(labels[i:]))
            if hit is not None:
                return hit
        return None

    def match(self, host: str) -> Entry | None:
        """The entry that allows ``host``: an exact entry beats any wildcard."""
        name = host.strip().rstrip(".").lower()
        hit = self._exact.get(name)
        return hit if hit is not None else self.covering_wildcard(name)

    def match_ip(
        self, ip: str | IPAddress, github_networks: Iterable[IPNetwork] = ()
    ) -> Entry | None:
        """The most specific network entry containing ``ip`` (``@github`` last)."""
        try:
            addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        except ValueError:
            return None
        best: Entry | None = None
        for e in self.entries:
            if e.kind is EntryKind.CIDR:
                net = e.network
                if addr in net and (best is None or net.prefixlen > best.network.prefixlen):
                    best = e
        if best is None and self.github:
            for net in github_networks:
                if addr.version == net.version and addr in net:
                    return next(e for e in self.entries if e.kind is EntryKind.GITHUB)
        return best


def show(text: str, limit: int = 40) -> str:
    """``text`` made safe for an error line: escaped, quoted, truncated."""
    cut = text if len(text) <= limit else text[:limit] + "…"
    return ascii(cut)


def _bad_char(text: str) -> str | None:
    for ch in text:
        if ch.isspace():
            return "whitespace inside an entry (one entry a line)"
        if ord(ch) < 32 or ord(ch) == 127:
            return f"control byte {ch!a} is not allowed"
        if ord(ch) > 127:
            return f"non-ASCII character {ch!a}: write names in punycode (xn--…)"
    match = re.search(r"[^a-z0-9.*:/\[\],@-]", text)
    if match:
        return f"character {match.group()!r} is not allowed in an allowlist entry"
    return None


def validate_hostname(name: str) -> str:
    """Lower-cased, trailing-dot-stripped RFC 1123 name; ``ValueError`` says why not."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty host name")
    bad = _bad_char(name)
    if bad:
        raise ValueError(bad)
    if "*" in name:
        raise ValueError("'*' is only allowed as the whole leftmost label (*.example.com)")
    if len(name) > MAX_NAME:
        raise ValueError(f"host name is {len(name)} characters long (at most {MAX_NAME})")
    labels = name.split(".")
    if len(labels) < 2:
        raise ValueError(f"{show(name)} is a single label: allow a full name (example.com)")
    for label in labels:
        if not label:
            raise ValueError(f"empty label in {show(name)}")
        if len(label) > MAX_LABEL:
            raise ValueError(f"label of {len(label)} characters (at most {MAX_LABEL})")
        if not _LABEL.match(label):
            raise ValueError(
                f"label {show(label)} must be letters, digits and inner '-' only"
            )
    if labels[-1].isdigit():
        raise ValueError(f"{show(name)} looks like an address but is not a valid IP")
    return name


def _parse_ports(text: str) -> tuple[int, ...]:
    if not _PORTS.match(text):
        raise ValueError(f"bad port list {show(text)}: use 443 or 443,8443")
    ports = sorted({int(p) for p in text.split(",")})
    if ports[0] < 1 or ports[-1] > 65535:
        raise ValueError(f"port out of range 1-65535 in {show(text)}")
    if len(ports) > MAX_PORTS:
        raise ValueError(f"{len(ports)} ports (at most {MAX_PORTS} per entry)")
    return tuple(ports)


def _parse_network(text: str) -> str:
    if not _IP_CHARS.match(text):
        raise ValueError(f"{show(text)} is not an IP address or network")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text} has host bits set: did you mean {fixed}?") from None
        raise ValueError(f"{show(text)} is not an IP address or network") from None
    if net.prefixlen < MIN_PREFIX[net.version]:
        raise ValueError(
            f"{net} is broader than /{MIN_PREFIX[net.version]}: too wide to allowlist"
        )
    if net.version == 6 and net.overlaps(_MAPPED):
        raise ValueError(f"{net} overlaps IPv4-mapped ::ffff:0:0/96: allowlist the IPv4 form")
    return str(net)


def _split_ports(text: str) -> tuple[str, tuple[int, ...] | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("'[' without ']': write [2001:db8::/32]:443")
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("text after ']' must be ':PORTS'")
        return text[1:end], _parse_ports(rest[1:]) if rest else None
    if text.count(":") == 1:
        host, ports = text.split(":")
        return host, _parse_ports(ports)
    return text, None


def parse_entry(text: str, source: str = "", lineno: int = 0) -> Entry:
    """One entry with its optional rules (no comment, stripped); ``ValueError`` says
    why it is invalid."""
    if not text:
        raise ValueError("empty entry")
    if len(text) > MAX_LINE:
        raise ValueError(f"entry of {len(text)} characters (at most {MAX_LINE})")
    head, *words = _WORDS.split(text.strip(" \t"))
    # the rule part first: a second word that is not KEY=VALUE most often means two
    # entries on one line, and that is the thing to say
    rules = parse_rules(words) if words else None
    bad = _bad_char(head.lower())
    if bad:
        raise ValueError(bad)
    body, ports = _split_ports(head.lower())
    ports = ports or DEFAULT_PORTS
    if body == "@github":
        if rules is not None:
            raise ValueError("@github takes no rules: they would apply only to requests made "
                             "to a bare GitHub address; put them on the names "
                             "(github.com preset=github)")
        return Entry(EntryKind.GITHUB, "@github", ports, source, lineno)
    if body.startswith("@"):
        raise ValueError(f"unknown source {show(body)}: only @github exists")
    if "/" in body or ":" in body or _looks_like_ipv4(body):
        return Entry(EntryKind.CIDR, _parse_network(body), ports, source, lineno, rules)
    if body.startswith("*."):
        if "." not in body[2:].rstrip("."):
            raise ValueError(f"{show(body)} would allow a whole top-level domain")
        domain = validate_hostname(body[2:])
        return Entry(EntryKind.WILDCARD, "*." + domain, ports, source, lineno, rules)
    if body == "*":
        raise ValueError("'*' alone would allow everything")
    return Entry(EntryKind.HOST, validate_hostname(body), ports, source, lineno, rules)


def parse_rules(words: Sequence[str]) -> Rules:
    """The rule part of a line: ``KEY=VALUE`` words, each key at most once."""
    seen: dict[str, tuple[str, ...]] = {}
    for word in words:
        if "=" not in word:
            raise ValueError(
                f"{show(word)} after the entry is not a rule: whitespace separates an entry "
                f"from its rules ({RULE_HELP}); one entry a line")
        key, value = word.split("=", 1)
        if key not in RULE_KEYS:
            raise ValueError(f"unknown rule {show(key)}: the rules are {RULE_HELP}")
        values = _rule_values(key, value)  # first: a message below may quote the value
        if key in seen and key == "preset":
            raise ValueError("preset= given twice: one preset a line")
        if key in seen:
            raise ValueError(f"{key}= given twice: list every value in one rule "
                             f"({key}={','.join(seen[key] + values)})")
        seen[key] = values
    preset = seen.get("preset")
    return Rules(seen.get("methods"), seen.get("paths"), preset[0] if preset else None)


def _rule_values(key: str, value: str) -> tuple[str, ...]:
    for ch in value:
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"control byte {ch!a} in {key}=")
        if ord(ch) > 127:
            raise ValueError(f"non-ASCII character {ch!a} in {key}=: percent-encode it")
    if key == "preset":
        if value not in PRESETS:
            raise ValueError(f"unknown preset {show(value)}: one of {', '.join(PRESETS)}")
        return (value,)
    items = value.split(",")
    if not value or not all(items):
        raise ValueError(f"empty value in {key}={show(value)}: write {key}=A,B")
    if len(items) > MAX_RULE_VALUES:
        raise ValueError(f"{len(items)} values in {key}= (at most {MAX_RULE_VALUES})")
    for item in items:
        _check_rule_value(key, item)
    return tuple(dict.fromkeys(items))


def _check_rule_value(key: str, item: str) -> None:
    if key == "methods":
        if METHOD.match(item.upper()) and not METHOD.match(item):
            # HTTP methods are case-sensitive (RFC 9110): 'get' is not GET
            raise ValueError(f"method {show(item)}: methods are upper case ({item.upper()})")
        if not METHOD.match(item):
            raise ValueError(f"bad method {show(item)}: letters only (GET, POST, ...)")
        return
    if not item.startswith("/"):
        raise ValueError(f"path prefix {show(item)} must start with '/'")
    if not PATH_PREFIX.match(item):
        raise ValueError(f"bad path prefix {show(item)}: letters, digits and "
                         f"-._~!$&'()*+;=:@%/ only, at most 200 characters")
    if any(seg in (".", "..") for seg in unquote(item).split("/")):
        raise ValueError(f"path prefix {show(item)} has a '.' or '..' segment: "
                         f"write the path the server sees")


def _revalidate_rules(e: Entry) -> bool:
    r = e.rules
    if r is None:
        return True
    if not isinstance(r, Rules) or e.kind is EntryKind.GITHUB:
        raise ValueError("rules on an @github entry, or not a Rules")
    if r.methods is None and r.paths is None and r.preset is None:
        return False  # an empty rule part is written rules=None
    words = [f"preset={r.preset}"] if r.preset is not None else []
    for key, values in (("methods", r.methods), ("paths", r.paths)):
        if values is not None:
            if not isinstance(values, tuple) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{key} must be a tuple of strings")
            words.append(f"{key}={','.join(values)}")
    return parse_rules(words) == r


def policy_entry(entry: Entry, expires: float | None = None) -> PolicyEntry:
    """``entry`` as the proxy's policy carries it (``expires``: a temporary grant's)."""
    return PolicyEntry(entry.kind.value, entry.value, entry.ports, entry.where, entry.rules,
                       expires)


def _revalidate(e: Entry) -> bool:
    if not e.ports or any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536
                          for p in e.ports):
        raise ValueError(f"bad ports {e.ports!r}")
    if not _revalidate_rules(e):
        return False
    if e.kind is EntryKind.HOST:
        return validate_hostname(e.value) == e.value
    if e.kind is EntryKind.WILDCARD:
        domain = e.value[2:]
        return e.value.startswith("*.") and "." in domain and validate_hostname(domain) == domain
    if e.kind is EntryKind.CIDR:
        return _parse_network(e.value) == e.value
    return e.kind is EntryKind.GITHUB and e.value == "@github"


def _looks_like_ipv4(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", text))


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip(" \t\r")


def parse_lines(lines: Iterable[tuple[int, str]], source: str) -> list[Entry]:
    """Entries from ``(lineno, text)`` pairs; all problems raised as one error."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    for lineno, raw in lines:
        text = _strip_comment(raw)
        if not text:
            continue
        try:
            entries.append(parse_entry(text, source, lineno))
        except ValueError as exc:
            problems.append(Problem(source, lineno, str(exc)))
    if problems:
        raise AllowlistError(problems)
    return entries


def parse_text(text: str, source: str) -> list[Entry]:
    """Parse a whole file's text. Only ``\\n`` ends a line, so ``\\x0b`` and friends
    stay inside the line that carries them and are rejected there."""
    return parse_lines(enumerate(text.split("\n"), start=1), source)


def parse_env(value: str, source: str = ENV_SOURCE) -> list[Entry]:
    """``CODETAINER_ALLOW``: entries separated by ``;`` or newlines when the value holds
    either (entries with rules contain commas: ``a.com methods=GET,HEAD; b.com``), else
    comma-separated as before. With commas, a piece made only of digits continues the
    previous entry's port list (``a.com:443,8443,b.com``). The 'line number' in errors
    is the entry's position in the list. A path prefix holding ``;`` cannot be given
    here (it would split the entry): put that line in the allowlist file."""
    if ";" in value or "\n" in value:
        split = (p.strip(" \t\r") for p in re.split(r"[;\n]", value))
        return parse_lines(enumerate((p for p in split if p), start=1), source)
    if "=" in value and "," in value:
        raise AllowlistError([Problem(source, 1, (
            "entries with rules contain commas: separate the entries with ';' or newlines "
            "(a.com methods=GET,HEAD; b.com)"))])
    pieces: list[tuple[int, str]] = []
    for raw in value.split(","):
        piece = raw.strip(" \t\r\n")
        if not piece:
            continue
        if piece.isdigit() and pieces and ":" in pieces[-1][1]:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + "," + piece)
        elif piece.isdigit() and pieces and pieces[-1][1].endswith("]"):
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + ":" + piece)
        else:
            pieces.append((len(pieces) + 1, piece))
    return parse_lines(pieces, source)


def load_allowlist(path: str | Path | None, env_value: str = "") -> Allowlist:
    """The file (if given) plus ``CODETAINER_ALLOW``; one error lists every bad line.

    An unreadable file is an error too: the boot step must fail closed.
    """
    problems: list[Problem] = []
    entries: list[Entry] = []
    if path is not None:
        p = Path(path)
        try:
            text = p.read_bytes().decode("utf-8", errors="surrogateescape")
        except OSError as exc:
            raise AllowlistError(
                [Problem(str(p), 0, f"cannot read the allowlist: {exc.strerror or exc}")]
            ) from exc
        try:
            entries.extend(parse_text(text, str(p)))
        except AllowlistError as exc:
            problems.extend(exc.problems)
    if env_value.strip():
        try:
            entries.extend(parse_env(env_value))
        except AllowlistError as exc:
            problems.extend(exc.problems)
    if problems:
        raise AllowlistError(problems)
    return Allowlist(tuple(entries))
