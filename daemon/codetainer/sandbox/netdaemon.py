"""codetainerd with the network boot steps, as PID 1 in a World's inner netns: the
allowlist, DNS records and services file the network tests and benchmarks share, and the
rotation run (an allowed name moving between addresses under a resolve-and-connect
loop from the agent's uid).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from codetainer.sandbox.daemonproc import DaemonProc
from codetainer.sandbox.world import ALLOWED_HOSTS, NEVER_HOSTS, UPSTREAM, World

AGENT = 1000
ENGINES = ["coredns", "dnsmasq"]
NET_STEPS = "network-config,dns,firewall,network-selftest,services"

ALLOWED = ALLOWED_HOSTS[0]  # allowed.test
WILD = ALLOWED_HOSTS[1]  # a.wild.test
EXTRA = ALLOWED_HOSTS[2]  # extra.test: granted with `codetainer allow`
SUB = ALLOWED_HOSTS[3]  # sub.allowed.test: the upstream answers, we must not
DENIED = NEVER_HOSTS[0]  # denied.test
ALLOWLIST = """\
# test allowlist
allowed.test          # exact: its subdomains stay refused
*.wild.test:443       # wildcard: subdomains yes, the apex no
"""
RECORDS = {
    "allowed.test": [ALLOWED],
    "sub.allowed.test": [SUB],
    "a.wild.test": [WILD],
    "wild.test": [ALLOWED_HOSTS[4]],
    "denied.test": [DENIED],
    "extra.test": [EXTRA],
    # An attacker's records under an allowlisted wildcard, pointing inside
    "meta.wild.test": ["169.254.169.254"],
    "lan.wild.test": ["10.1.2.3", WILD],
}

SERVICES = """\
[supervisord]
nodaemon=true

[program:dns]
command={run}/dns/exec
priority=10
autostart=false
autorestart=true
startsecs=1
startretries=5
stopsignal=TERM
stopwaitsecs=5
stopasgroup=true
killasgroup=true
redirect_stderr=true
"""


def start_daemon(world: World, tmp: Path, allowlist: str = ALLOWLIST, *,
                 env: dict[str, str] | None = None, steps: str = NET_STEPS,
                 services: str = SERVICES, engine: str = "dnsmasq") -> DaemonProc:
    """``engine``: set explicitly (``auto`` would pick CoreDNS wherever it is on PATH)."""
    allow = tmp / "domains.conf"
    allow.write_text(allowlist)
    full = {
        "CODETAINER_DNS_ENGINE": engine,
        "CODETAINER_UPSTREAMS": UPSTREAM,
        "CODETAINER_ALLOWLIST": str(allow),
        "CODETAINER_DNS_USER": "nobody",
        "CODETAINER_AGENT_USER": str(AGENT),
        "CODETAINER_RESOLV_CONF": str(tmp / "resolv.conf"),
        "CODETAINER_PROBE_DENIED": f"{NEVER_HOSTS[-1]}:443",
        "CODETAINER_LOG_FORMAT": "json",
        "CODETAINER_REFRESH_MIN_TTL": "1",
        "CODETAINER_REFRESH_MAX_TTL": "5",
        "CODETAINER_REFRESH_GRACE": "30",
        **(env or {}),
    }
    d = DaemonProc(tmp, services.format(run=tmp / "run"), steps=steps, env=full, netns=world.inner)
    try:
        d.wait_socket()
    except BaseException:
        d.close()
        raise
    return d


def wait_boot(d: DaemonProc, timeout: float = 45.0) -> dict[str, Any]:
    st: dict[str, Any] = d.wait_until(lambda: (s := d.status())["state"] != "BOOTING" and s,
                                      timeout, "boot to finish")
    return st


ROTATION = ALLOWED_HOSTS[10:30]  # 20 addresses

# Resolve through the local server (stdlib only), connect to the first address at once.
RESOLVE_CONNECT = r"""
import errno, json, random, socket, struct, sys, time
server, name, n, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
LINGER0 = struct.pack("ii", 1, 0)
def query(name):
    qid = random.randrange(65536)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    try:
        s.sendto(q, (server, 53)); data = s.recv(4096)
    finally:
        s.close()
    rcode = data[3] & 15
    an = struct.unpack("!H", data[6:8])[0]
    i = 12
    while data[i]: i += data[i] + 1
    i += 5
    out = []
    for _ in range(an):
        if data[i] & 0xC0 == 0xC0: i += 2
        else:
            while data[i]: i += data[i] + 1
            i += 1
        t, c, ttl, ln = struct.unpack("!HHIH", data[i:i + 10]); i += 10
        if t == 1: out.append(socket.inet_ntoa(data[i:i + 4]))
        i += ln
    return rcode, out
ok, fail, seen = 0, {}, set()
start = time.monotonic()
for k in range(n):
    t0 = start + k * interval
    time.sleep(max(0.0, t0 - time.monotonic()))
    try:
        rcode, addrs = query(name)
    except OSError as e:
        r = "dns " + type(e).__name__; fail[r] = fail.get(r, 0) + 1; continue
    if not addrs:
        r = f"dns rcode {rcode}"; fail[r] = fail.get(r, 0) + 1; continue
    seen.add(addrs[0])
    try:
        s = socket.create_connection((addrs[0], 443), timeout=2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0); s.close(); ok += 1
    except TimeoutError:
        fail["timeout"] = fail.get("timeout", 0) + 1
    except OSError as e:
        r = errno.errorcode.get(e.errno or 0, "error"); fail[r] = fail.get(r, 0) + 1
print(json.dumps({"ok": ok, "fail": fail, "addresses": sorted(seen),
                  "seconds": time.monotonic() - start}))
"""


def rotate(world: World, name: str, addrs: list[str], period: float, stop: threading.Event) -> None:
    i = 0
    while not stop.wait(period):
        i += 1
        world.set_records(name, [addrs[i % len(addrs)]], wait=False)


def rotation_run(world: World, attempts: int, seconds: float) -> dict[str, object]:
    stop = threading.Event()
    mover = threading.Thread(target=rotate, args=(world, "rot.test", list(ROTATION), 2.0, stop))
    mover.start()
    try:
        out = world.python_in(world.inner, RESOLVE_CONNECT, "127.0.0.53", "rot.test", str(attempts),
                              str(seconds / attempts), uid=AGENT, timeout=seconds + 60)
    finally:
        stop.set()
        mover.join()
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result
