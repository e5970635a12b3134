"""What the idle daemon keeps (issue 10, idle RSS): the imports it never uses stay out
(``init/pid1.py``'s lean imports, the services file parsed in a forked child, psutil and
urllib imported where used), and what they left behind still works: the parse's answers
and errors, ``ssl`` and ``hashlib`` for whoever imports them later, the DNS check's quick
"refused"."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from codetainer.network import dnscheck
from codetainer.services.config import ServiceConfigError, load_services

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "supervisord" / "codetainer.conf"
#: each is megabytes the daemon would keep and never use without the network or a session
NEVER_KEPT = ("ssl", "_ssl", "_hashlib", "tornado", "supervisor", "supervisor.options", "dns",
              "xmlrpc.client", "http.client", "urllib.request", "psutil")


def run_probe(code: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=60)
    out: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    return out


def test_the_daemon_keeps_none_of_what_it_never_uses() -> None:
    out = run_probe(
        "import json, sys\n"
        "from codetainer.init.pid1 import _lean_imports\n"
        "_lean_imports()\n"
        "import codetainer.daemon\n"
        "from codetainer.services.config import load_services\n"
        f"names = [s.name for s in load_services({str(SERVICES)!r})]\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'names': names}))\n")
    assert out["names"] == [s.name for s in load_services(SERVICES)] == ["dns", "proxy"]
    kept = set(NEVER_KEPT) & set(out["modules"])
    assert not kept, f"the idle daemon imports {sorted(kept)}"


def test_what_the_lean_imports_left_out_is_there_for_later_importers() -> None:
    out = run_probe(
        "import json\n"
        "from codetainer.init.pid1 import _lean_imports\n"
        "_lean_imports()\n"
        "import asyncio.base_events, hashlib, hmac, tenacity\n"
        "import ssl, urllib.request\n"
        "print(json.dumps({'asyncio_ssl': asyncio.base_events.ssl is None,\n"
        "                  'urllib_ssl': urllib.request.ssl is ssl,\n"
        "                  'context': type(ssl.create_default_context()).__name__,\n"
        "                  'sha256': hashlib.sha256(b'x').hexdigest()[:8],\n"
        "                  'hmac': hmac.new(b'k', b'x', 'sha256').hexdigest()[:8],\n"
        "                  'tornado': tenacity.tornado is None}))\n")
    assert out == {"asyncio_ssl": True, "urllib_ssl": True, "context": "SSLContext",
                   "sha256": hashlib.sha256(b"x").hexdigest()[:8],  # OpenSSL's, here
                   "hmac": hmac.new(b"k", b"x", "sha256").hexdigest()[:8], "tornado": True}


def test_the_parse_in_the_child_raises_the_parsers_errors(tmp_path: Path) -> None:
    with pytest.raises(ServiceConfigError, match="does not exist: create it"):
        load_services(tmp_path / "absent.conf")
    bad = tmp_path / "bad.conf"
    bad.write_text("[supervisord]\n[program:a]\ncommand=echo 'unclosed\n")
    with pytest.raises(ServiceConfigError, match=r"\[program:a\] command cannot be parsed"):
        load_services(bad)
    bad.write_text("[supervisord]\n[program:a]\ncommand=true\nstartsecs=soon\n")
    with pytest.raises(ServiceConfigError, match=f"{bad}: "):
        load_services(bad)


def test_a_dns_port_nobody_listens_on_is_refused_at_once() -> None:
    """The DNS server's start probe: not yet listening is an ERROR now, not a TIMEOUT at
    the end of the probe's timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, then closed: nobody listens on it
    t0 = time.monotonic()
    answer = asyncio.run(dnscheck.query("allowed.test", "A", "127.0.0.1", port, timeout=2.0))
    assert answer.rcode == "ERROR" and "ConnectionRefusedError" in str(answer.error)
    assert time.monotonic() - t0 < 1.0


def test_a_prefetched_parse_is_the_one_asked_and_others_are_let_go(tmp_path: Path) -> None:
    from codetainer.services import config

    other = tmp_path / "other.conf"
    other.write_text("[supervisord]\n[program:other]\ncommand=true\n")
    config.prefetch(SERVICES)
    config.prefetch(other)
    children = {p: c.pid for p, c in config._PREFETCHED.items()}
    assert set(children) == {SERVICES, other}
    assert [s.name for s in config.load_services(SERVICES)] == ["dns", "proxy"]
    assert config._PREFETCHED == {}
    for pid in children.values():  # both reaped: the asked one and the one let go
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
