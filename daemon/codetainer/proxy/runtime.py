"""What the proxy process does besides deciding, without mitmproxy: pure and testable.

- :class:`PolicyFile`: ``policy.json``, re-read when it changes (checked at most every
  :data:`POLICY_CHECK_S`); a file that cannot be read or does not validate leaves the
  proxy refusing everything, never allowing more.
- :class:`Credentials` and :func:`rewrite_auth`: the real tokens, and the
  ``Authorization``/``x-api-key`` headers an allowed request leaves with: a placeholder
  the agent holds is never sent anywhere, a credential the policy grants replaces what
  the agent sent.
- :class:`RefusedLog`: every refused request, keyed by (host, method, path without
  query, entry), written to ``state/refused.json`` debounced and bounded; the daemon
  reads it back with :func:`read_refused` for ``codetainer status``.

:mod:`codetainer.proxy.addon` glues these to mitmproxy; the daemon imports only
:func:`read_refused` from here.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codetainer.proxy.model import (
    ANTHROPIC_PLACEHOLDER,
    CREDENTIAL_ANTHROPIC,
    CREDENTIAL_GITHUB_API,
    CREDENTIAL_GITHUB_GIT,
    GITHUB_PLACEHOLDER,
    ProxyPolicy,
    RefusedRecord,
)

#: seconds between two looks at policy.json's mtime
POLICY_CHECK_S = 0.5
#: refused.json is written at most this often...
WRITE_INTERVAL_S = 0.5
#: ...and this long after the last change at the soonest (a burst is written once)
WRITE_SETTLE_S = 0.05
#: refused (host, method, path, entry) keys kept: the most recent ones
MAX_RECORDS = 256
PLACEHOLDERS = (GITHUB_PLACEHOLDER, ANTHROPIC_PLACEHOLDER)


# --- policy.json ------------------------------------------------------------------------


class PolicyFile:
    """``policy.json`` as the proxy holds it: :attr:`policy` is None while the file is
    missing or invalid (:attr:`error` says why), and everything is refused then."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.policy: ProxyPolicy | None = None
        self.error = "not read yet"
        self._sig: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    def current(self, now: float | None = None) -> bool:
        """Re-read the file if it changed and the last look is old enough; True when
        this call (re)loaded it or found it broken anew (the caller may log it)."""
        mono = time.monotonic() if now is None else now
        if mono - self._checked < POLICY_CHECK_S:
            return False
        self._checked = mono
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return self._fail(None, f"cannot read {self.path}: {exc.strerror or exc}")
        sig = (st.st_mtime_ns, st.st_ino, st.st_size)
        if sig == self._sig:
            return False
        try:
            text = self.path.read_text(encoding="utf-8")
            policy = ProxyPolicy.from_json(text)
        except (OSError, UnicodeDecodeError) as exc:
            return self._fail(sig, f"cannot read {self.path}: {exc}")
        except (ValueError, TypeError, KeyError) as exc:
            return self._fail(sig, f"{self.path} is invalid: {str(exc)[:300]}")
        self._sig, self.policy, self.error = sig, policy, ""
        return True

    def _fail(self, sig: tuple[int, int, int] | None, error: str) -> bool:
        changed = self.error != error or self.policy is not None
        self._sig, self.policy, self.error = sig, None, error
        return changed


# --- credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    github: str = ""
    anthropic: str = ""

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """``credentials.json`` ({"github": ..., "anthropic": ...}); ValueError says what
        is wrong (never with a value in it)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError:
            raise ValueError(f"{path} is not JSON") from None
        if not isinstance(data, dict) or not all(
                isinstance(data.get(k, ""), str) for k in ("github", "anthropic")):
            raise ValueError(f"{path}: expected string values for github and anthropic")
        return cls(data.get("github", "").strip(), data.get("anthropic", "").strip())


def holds_placeholder(value: str) -> bool:
    """Whether a header value carries a placeholder, in clear or inside Basic auth."""
    if any(p in value for p in PLACEHOLDERS):
        return True
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(rest.strip() + "==", validate=False).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return False
    return any(p in decoded for p in PLACEHOLDERS)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def rewrite_auth(authorization: list[str], api_keys: list[str], credential: str,
                 creds: Credentials) -> tuple[list[str], list[str]]:
    """The ``Authorization`` and ``x-api-key`` values an allowed request is sent with.

    Values holding a placeholder are dropped whatever the decision; a credential the
    policy grants replaces the request's ``Authorization`` (an attacker's token the
    agent was handed never reaches the configured repository in the operator's name,
    and the operator's never goes anywhere else). A credential whose token is not
    configured adds nothing.
    """
    auth = [v for v in authorization if not holds_placeholder(v)]
    keys = [v for v in api_keys if not holds_placeholder(v)]
    if credential == CREDENTIAL_GITHUB_GIT and creds.github:
        auth = [basic("x-access-token", creds.github)]
    elif credential == CREDENTIAL_GITHUB_API and creds.github:
        auth = [f"token {creds.github}"]
    elif credential == CREDENTIAL_ANTHROPIC and creds.anthropic:
        auth, keys = [f"Bearer {creds.anthropic}"], []
    return auth, keys


# --- request fields ---------------------------------------------------------------------


def split_authority(authority: str) -> tuple[str, int | None]:
    """(host, port) of ``name``, ``name:443``, ``[2001:db8::1]:443``; host lower case,
    without brackets or a trailing dot."""
    text = authority.strip()
    port: int | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if p.isdigit():
            port = int(p)
    else:
        host = text
    return host.lower().rstrip("."), port


def path_only(path: str) -> str:
    """The path without query or fragment (a query may hold a secret: never recorded)."""
    return path.split("?", 1)[0].split("#", 1)[0]


# --- refused requests ---------------------------------------------------------------------


class RefusedLog:
    """Refused requests in memory; :meth:`snapshot` is what ``refused.json`` holds.

    Writing is the caller's schedule: after :meth:`record`, call :meth:`flush_in` for
    the delay until the next write is due and :meth:`write` then. Writes are at most
    :data:`WRITE_INTERVAL_S` apart, and one follows the last change by
    :data:`WRITE_SETTLE_S` or more.
    """

    def __init__(self, path: Path, max_records: int = MAX_RECORDS) -> None:
        self.path = path
        self.max_records = max_records
        self.records: OrderedDict[tuple[str, str, str, str], RefusedRecord] = OrderedDict()
        self.requests = 0
        self.refused_total = 0
        self.dirty = False
        self.last_write = float("-inf")

    def seen(self) -> None:
        """Count one decided request (allowed or refused)."""
        self.requests += 1

    def record(self, host: str, method: str, path: str, *, where: str, rule: str, reason: str,
               now: float) -> RefusedRecord:
        key = (host, method, path_only(path)[:300], where)
        rec = self.records.get(key)
        if rec is None:
            rec = RefusedRecord(key[0], key[1], key[2], rule, where, reason, 0, now, now)
            self.records[key] = rec
            while len(self.records) > self.max_records:
                self.records.popitem(last=False)
        else:
            self.records.move_to_end(key)
            rec.rule, rec.reason = rule, reason
        rec.count += 1
        rec.last = now
        self.refused_total += 1
        self.dirty = True
        return rec

    def flush_in(self, now: float) -> float | None:
        """Seconds until the next write is due (None: nothing to write). ``now`` is on
        the monotonic clock, like :attr:`last_write`."""
        if not self.dirty:
            return None
        return max(WRITE_SETTLE_S, self.last_write + WRITE_INTERVAL_S - now)

    def snapshot(self) -> dict[str, Any]:
        rows = sorted(self.records.values(), key=lambda r: r.last, reverse=True)
        return {"refused": [r.as_dict() for r in rows], "requests": self.requests,
                "refused_total": self.refused_total}

    def write(self, now: float) -> None:
        """Replace refused.json (temporary file + rename: a reader never sees half)."""
        self.dirty = False
        self.last_write = now
        data = json.dumps(self.snapshot(), separators=(",", ":"))
        fd, tmp = tempfile.mkstemp(prefix=".refused.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_refused(path: Path) -> dict[str, Any]:
    """``refused.json`` as written by :meth:`RefusedLog.write`; empty when missing.
    ValueError when it does not parse."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"refused": [], "requests": 0, "refused_total": 0}
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("refused"), list):
        raise ValueError(f"{path}: not a refused-requests file")
    return data
