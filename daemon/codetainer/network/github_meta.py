"""``@github``: GitHub's published address ranges, fetched, validated and cached.

``https://api.github.com/meta`` lists GitHub's networks by service. We take a few
services (web, api, git, packages by default; ``actions`` is thousands of cloud ranges
and is left out), refuse the whole document if any prefix is broader than /8 (IPv4)
or /16 (IPv6) or if it lists more than ``max_count`` networks, and keep the last good
copy on disk (written atomically) for when the next fetch fails. The caller gets the
networks and where they came from: ``fresh``, ``cache`` or ``none``.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from codetainer import httpget
from codetainer.network.allowlist import MIN_PREFIX
from codetainer.network.model import IPNetwork

log = structlog.get_logger("codetainer.network")

DEFAULT_KEYS: tuple[str, ...] = ("web", "api", "git", "packages")
MAX_COUNT = 5000
MAX_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0


class MetaSource(enum.StrEnum):
    FRESH = "fresh"
    CACHE = "cache"
    NONE = "none"


class GithubMetaError(ValueError):
    """The meta document (or the cache) is unusable; the message says why."""


@dataclass(frozen=True)
class GithubRanges:
    networks: tuple[IPNetwork, ...]
    source: MetaSource
    #: wall-clock time the networks were fetched from GitHub (None: never)
    fetched_at: float | None = None
    #: why the fresh fetch failed, when it did
    error: str | None = None


def parse_meta(
    data: bytes | str, keys: Sequence[str] = DEFAULT_KEYS, max_count: int = MAX_COUNT
) -> tuple[IPNetwork, ...]:
    """Validated, de-duplicated, collapsed networks from a meta JSON document."""
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GithubMetaError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise GithubMetaError("not a JSON object")
    raw: list[str] = []
    for key in keys:
        values = doc.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise GithubMetaError(f"{key!r} is not a list of strings")
        raw.extend(values)
    return validate_networks(raw, max_count)


def validate_networks(raw: Iterable[str], max_count: int = MAX_COUNT) -> tuple[IPNetwork, ...]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in raw:
        try:
            # GitHub publishes a few ranges with host bits set; normalising is harmless
            # here because the prefix length, which bounds the range, is checked below.
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise GithubMetaError(f"{text[:60]!r} is not a network") from None
        if net.prefixlen < MIN_PREFIX[net.version]:
            raise GithubMetaError(f"{net} is broader than /{MIN_PREFIX[net.version]}")
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    nets: list[IPNetwork] = [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
    if not nets:
        raise GithubMetaError("no networks listed")
    if len(nets) > max_count:
        raise GithubMetaError(f"{len(nets)} networks (at most {max_count})")
    return tuple(nets)


async def _fetch(url: str, timeout: float) -> bytes:
    """The meta document (:mod:`codetainer.httpget`: in its own interpreter, so the
    daemon keeps no ``ssl`` for it)."""
    if not url.startswith(("https://", "http://")):
        raise GithubMetaError(f"URL must be http(s): {url[:80]!r}")
    body = await httpget.get(url, timeout=timeout, limit=MAX_BYTES,
                             headers={"Accept": "application/json", "User-Agent": "codetainer"})
    return body.encode()


def write_cache(path: Path, networks: Sequence[IPNetwork], fetched_at: float, url: str) -> None:
    """Atomically replace the cache (temporary file in the same directory + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {"url": url, "fetched_at": fetched_at, "networks": [str(n) for n in networks]}
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cache(path: Path, max_count: int = MAX_COUNT) -> tuple[tuple[IPNetwork, ...], float]:
    """Networks and fetch time from the cache, validated again (it is a file on disk)."""
    try:
        doc: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GithubMetaError(f"cache {path} unreadable: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("networks"), list):
        raise GithubMetaError(f"cache {path} has no network list")
    nets = doc["networks"]
    if not all(isinstance(n, str) for n in nets):
        raise GithubMetaError(f"cache {path} has a non-string network")
    fetched_at = doc.get("fetched_at")
    when = float(fetched_at) if isinstance(fetched_at, int | float) else 0.0
    return validate_networks(nets, max_count), when


async def load_github_ranges(
    url: str,
    cache_path: str | Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    keys: Sequence[str] = DEFAULT_KEYS,
    max_count: int = MAX_COUNT,
) -> GithubRanges:
    """Fetch and validate; on success refresh the cache, on failure fall back to it.

    Never raises for a network or validation problem: the result says ``none`` and
    carries the reason, and the caller decides whether that is fatal.
    """
    cache = Path(cache_path)
    try:
        data = await _fetch(url, timeout)
        nets = parse_meta(data, keys, max_count)
    except (OSError, GithubMetaError, TimeoutError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("github_meta_fetch_failed", url=url, error=error)
    else:
        now = time.time()
        try:
            write_cache(cache, nets, now, url)
        except OSError as exc:
            log.warning("github_meta_cache_write_failed", path=str(cache), error=str(exc))
        log.info("github_meta_fetched", url=url, networks=len(nets))
        return GithubRanges(nets, MetaSource.FRESH, now)
    try:
        nets, when = read_cache(cache, max_count)
    except GithubMetaError as exc:
        log.error("github_meta_unavailable", url=url, cache=str(cache), error=str(exc))
        return GithubRanges((), MetaSource.NONE, None, error)
    log.info("github_meta_cache_used", cache=str(cache), networks=len(nets), fetched_at=when)
    return GithubRanges(nets, MetaSource.CACHE, when, error)
