"""The policy proxy's cost, side by side with a direct connection, in one run.

Run as root: ``/opt/ctvenv/bin/python bench/bench_proxy.py [--quick]``. In a small test
world (codetainer/sandbox/world.py: two network namespaces, its DNS server) an HTTPS server with a
test CA certificate serves ``bench.test`` on a documentation address; in the inner
namespace (the container's) mitmdump runs with the product's addon and a ``policy.json``
allowing ``bench.test``, exactly as ``[program:proxy]`` runs it (the exec script of
``codetainer.proxy.setup``: the proxy's uid, ``--mode regular@127.0.0.1:3128 --mode
transparent@127.0.0.1:3129``, the product's options). A client in the inner namespace
measures three paths to the same server:

* direct: TCP + TLS straight to the server;
* explicit: through ``HTTPS_PROXY`` (CONNECT to 127.0.0.1:3128, then TLS with the
  proxy's certificate), as curl, git, gh, npm, pip and the Claude Code CLI go;
* transparent: straight to the server's address as uid 1000, which an nft ``redirect``
  in the inner namespace (the firewall's rule, reduced to this) hands to 3129.

It prints, per path: the latency of a small GET, p50/p99, on one kept-alive connection
and with a new connection (TCP, CONNECT, TLS) per request; the throughput of a 100 MB
download; and the first-byte time of a streamed response (SSE, chunks 100 ms apart)
on a connection that has carried one request (as the CLI's kept-alive connections), and
the lateness of the stream's last-arriving event against its schedule (buffering would
show there: events held back and delivered together).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import pct
from codetainer.sandbox.world import PYTHON, UPSTREAM, World

HOST = "bench.test"
ADDR = "203.0.113.70"
AGENT = 1000
PROXY_UID = 998  # codetainer-proxy in the image
PROXY_PORT, TRANSPARENT_PORT = 3128, 3129
BIG = 100 * 1024 * 1024
SSE_CHUNKS, SSE_GAP = 10, 0.1

# -- the server (world side) ---------------------------------------------------------------------

SERVER = r"""
import socket, ssl, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
addr, cert, key, big, chunks, gap = sys.argv[1:7]
BLOCK = b"x" * (1 << 20)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/small":
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        elif self.path == "/big":
            n = int(big)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                part = BLOCK[:min(n, len(BLOCK))]
                self.wfile.write(part); n -= len(part)
        elif self.path == "/sse":
            # the Messages API's shape: event-stream, chunked, events spaced in time
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for i in range(int(chunks)):
                ev = f"event: ping\ndata: {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev)); self.wfile.flush()
                if i + 1 < int(chunks):
                    time.sleep(float(gap))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
class S(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
    def finish_request(self, request, client_address):
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = ctx.wrap_socket(request, server_side=True)
        except OSError:
            return
        super().finish_request(tls, client_address)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
srv = S((addr, 443), H)
print("ready", flush=True)
srv.serve_forever()
"""

# -- the client (inner side, run as this file with --client) ------------------------------------


def _open(path: str, cfg: dict[str, Any], ctx: ssl.SSLContext) -> socket.socket:
    """A TLS connection to bench.test by ``path``: direct, explicit (CONNECT), transparent."""
    if path == "explicit":
        s = socket.create_connection(("127.0.0.1", PROXY_PORT), 10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise OSError(f"the proxy closed the CONNECT: {head!r}")
            head += chunk
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise OSError(f"CONNECT refused: {head.splitlines()[0]!r}")
    else:
        s = socket.create_connection((cfg["addr"], 443), 10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(s, server_hostname=HOST)


def _request(tls: ssl.SSLSocket, reader: Any, path: str) -> tuple[int, float, list[float]]:
    """GET ``path`` on an open connection: (body bytes, seconds to the first body byte,
    arrival time of each SSE event relative to the request)."""
    t0 = time.perf_counter()
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: bench\r\n\r\n".encode())
    status = reader.readline()
    if b" 200 " not in status:
        raise OSError(f"{path}: {status!r}")
    length, chunked = None, False
    while (line := reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
        elif k.lower() == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    events: list[float] = []
    first = 0.0
    total = 0
    if chunked:
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                reader.readline()
                break
            data = reader.read(size)
            reader.readline()
            now = time.perf_counter() - t0
            first = first or now
            total += len(data)
            events += [now] * data.count(b"\n\n")
    else:
        assert length is not None
        left = length
        while left:
            data = reader.read1(min(left, 1 << 20)) if hasattr(reader, "read1") \
                else reader.read(min(left, 1 << 20))
            if not data:
                raise OSError("short body")
            first = first or time.perf_counter() - t0
            left -= len(data)
            total += len(data)
    return total, first, events


def client(cfg: dict[str, Any]) -> dict[str, Any]:
    ctx = ssl.create_default_context()
    for ca in cfg["cas"]:
        ctx.load_verify_locations(ca)
    ctx.set_alpn_protocols(["http/1.1"])
    path = cfg["path"]
    out: dict[str, Any] = {}
    # keep-alive: one connection, many requests
    tls = _open(path, cfg, ctx)
    reader = tls.makefile("rb")
    for _ in range(20):
        _request(tls, reader, "/small")  # warm-up
    lat = []
    for _ in range(cfg["n_keepalive"]):
        t = time.perf_counter()
        _request(tls, reader, "/small")
        lat.append((time.perf_counter() - t) * 1000)
    tls.close()
    out["keepalive_ms"] = lat
    # a new connection (TCP, CONNECT, TLS) for every request
    lat = []
    for _ in range(cfg["n_new"]):
        t = time.perf_counter()
        tls = _open(path, cfg, ctx)
        reader = tls.makefile("rb")
        _request(tls, reader, "/small")
        lat.append((time.perf_counter() - t) * 1000)
        tls.close()
    out["new_ms"] = lat
    # 100 MB download
    tls = _open(path, cfg, ctx)
    reader = tls.makefile("rb", buffering=1 << 20)
    t = time.perf_counter()
    n, _, _ = _request(tls, reader, "/big")
    out["big_s"] = time.perf_counter() - t
    out["big_bytes"] = n
    tls.close()
    # streamed response: first byte and lateness of each event against its schedule, on
    # a connection that has carried one request (as the CLI's kept-alive connections)
    firsts, late = [], []
    for _ in range(cfg["n_sse"]):
        tls = _open(path, cfg, ctx)
        reader = tls.makefile("rb", buffering=0)
        _request(tls, reader, "/small")
        _, first, events = _request(tls, reader, "/sse")
        tls.close()
        assert len(events) == SSE_CHUNKS, events
        firsts.append(first * 1000)
        late.append(max((e - events[0] - i * SSE_GAP) * 1000 for i, e in enumerate(events)))
    out["sse_first_ms"] = firsts
    out["sse_late_ms"] = late
    return out


# -- the proxy (inner side) --------------------------------------------------------------------------


def policy_json() -> str:
    """A policy allowing bench.test on 443 without rules (every method and path)."""
    from codetainer.proxy.model import PolicyEntry, ProxyPolicy

    return ProxyPolicy((PolicyEntry("host", HOST, (443, 80), "bench:1"),)).to_json()


def proxy_exec(run: Path, upstream_ca: Path) -> tuple[Path, Path]:
    """The product's ``[program:proxy]`` command (``codetainer.proxy.setup.exec_script``:
    mitmdump as the proxy's uid, the addon, the same modes and options) over a run
    directory laid out as the ``proxy`` boot step lays it out: policy.json, the CA as
    key + certificate in ``conf/``, the upstream CA file, ``state/``. Returns (the exec
    script, the proxy's CA certificate)."""
    from codetainer.proxy.setup import MITM_CA_FILE, UPSTREAM_CA_FILE, exec_script
    from codetainer.sandbox.apistandin import make_ca

    ca = make_ca(run.parent / "proxyca", ("proxy.bench.test",))
    for sub, mode in (("conf", 0o700), ("state", 0o755)):
        (run / sub).mkdir(parents=True, exist_ok=True)
        os.chown(run / sub, PROXY_UID, PROXY_UID)
        (run / sub).chmod(mode)
    conf = run / "conf" / MITM_CA_FILE
    conf.write_text((ca.parent / "ca.key").read_text() + ca.read_text())
    os.chown(conf, PROXY_UID, PROXY_UID)
    conf.chmod(0o400)
    (run / "policy.json").write_text(policy_json())
    shutil.copyfile(upstream_ca, run / UPSTREAM_CA_FILE)
    script = run / "exec"
    script.write_text(exec_script(run, PROXY_UID, PROXY_UID, ["127.0.0.1"]))
    script.chmod(0o755)
    return script, ca


def wait_listening(world: World, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    code = ("import socket,sys\ntry:\n socket.create_connection(('127.0.0.1', int(sys.argv[1])),"
            " 1).close(); print('up')\nexcept OSError: print('down')")
    while world.python_in(world.inner, code, str(port)).stdout.strip() != "up":
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} in the inner namespace")
        time.sleep(0.05)


def run_bench(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from codetainer.sandbox.apistandin import make_ca

    tmp = Path(tempfile.mkdtemp(prefix="ct-bench-proxy-"))
    tmp.chmod(0o755)
    try:
        with World(ttl=60, servers=False) as world:
            ca = make_ca(tmp / "tls", (HOST,))
            world.run_in(world.world, ["ip", "addr", "add", f"{ADDR}/32", "dev", "lo"], check=True)
            srv = world.spawn_in(world.world, [PYTHON, "-I", "-c", SERVER, ADDR,
                                               str(tmp / "tls" / "server.pem"),
                                               str(tmp / "tls" / "server.key"), str(BIG),
                                               str(SSE_CHUNKS), str(SSE_GAP)])
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            world.set_records(HOST, [ADDR])
            run = tmp / "run"
            script, mitm_ca = proxy_exec(run, ca)
            resolv = tmp / "resolv.conf"
            resolv.write_text(f"nameserver {UPSTREAM}\n")
            # the proxy resolves bench.test through the world's DNS: a mount namespace of
            # its own with that resolv.conf, nothing of the host's changed
            proxy = world.spawn_in(world.inner, [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind {resolv} /etc/resolv.conf && exec "$@"', "sh", str(script)])
            wait_listening(world, PROXY_PORT)
            wait_listening(world, TRANSPARENT_PORT)
            nft = (f"table ip bench {{\n chain out {{\n  type nat hook output priority -100;\n"
                   f"  meta skuid {AGENT} ip daddr {ADDR} tcp dport 443 "
                   f"redirect to :{TRANSPARENT_PORT}\n }}\n}}\n")
            world.run_in(world.inner, ["nft", "-f", "-"], input=nft, check=True)
            cfg = {"addr": ADDR, "cas": [str(ca), str(mitm_ca)], "n_keepalive": args.n,
                   "n_new": args.n_new, "n_sse": args.n_sse}
            results: dict[str, dict[str, Any]] = {}
            # alternate the paths, rounds times, so warm-up and drift hit them alike
            for _ in range(args.rounds):
                for path in ("direct", "explicit", "transparent"):
                    uid = AGENT if path == "transparent" else None
                    r = world.run_in(world.inner, [sys.executable, __file__, "--client",
                                                   json.dumps({**cfg, "path": path})],
                                     uid=uid, timeout=900)
                    if r.returncode != 0:
                        raise RuntimeError(f"{path} client failed: {r.stderr[-3000:]}\n"
                                           f"proxy: {proxy.poll()}")
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    acc = results.setdefault(path, {})
                    for k, v in res.items():
                        acc.setdefault(k, []).extend(v if isinstance(v, list) else [v])
            return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict[str, dict[str, Any]]) -> None:
    paths = ("direct", "explicit", "transparent")
    head = "".join(f"{p:>22}" for p in paths)
    print(f"{'':34}{head}")

    def row(label: str, cell: Any) -> None:
        print(f"  {label:<32}" + "".join(f"{cell(results[p]):>22}" for p in paths))

    row("keep-alive GET p50 / p99 (ms)",
        lambda r: f"{pct(r['keepalive_ms'], 50):.2f} / {pct(r['keepalive_ms'], 99):.2f}")
    row("new connection p50 / p99 (ms)",
        lambda r: f"{pct(r['new_ms'], 50):.2f} / {pct(r['new_ms'], 99):.2f}")
    def rate(r: dict[str, Any]) -> str:
        pairs = zip(r["big_bytes"], r["big_s"], strict=True)
        return f"{statistics.median(b / s / 1e6 for b, s in pairs):.0f}"

    row("100 MB download (MB/s)", rate)
    row("SSE first byte p50 (ms)", lambda r: f"{pct(r['sse_first_ms'], 50):.2f}")
    row("SSE event lateness p50 / max (ms)",
        lambda r: f"{pct(r['sse_late_ms'], 50):.2f} / {max(r['sse_late_ms']):.2f}")
    d = results["direct"]
    for p in paths[1:]:
        r = results[p]
        print(f"  added by the proxy ({p}): keep-alive p50 "
              f"{pct(r['keepalive_ms'], 50) - pct(d['keepalive_ms'], 50):+.2f} ms, "
              f"p99 {pct(r['keepalive_ms'], 99) - pct(d['keepalive_ms'], 99):+.2f} ms; new "
              f"connection p50 {pct(r['new_ms'], 50) - pct(d['new_ms'], 50):+.2f} ms; SSE first "
              f"byte {pct(r['sse_first_ms'], 50) - pct(d['sse_first_ms'], 50):+.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, one round")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client(json.loads(args.client))))
        return 0
    if os.geteuid() != 0:
        print("bench_proxy: run as root (it builds network namespaces)")
        return 2
    args.n, args.n_new, args.n_sse, args.rounds = (200, 50, 3, 1) if args.quick else (500, 200, 5, 3)
    print("== codetainer policy proxy benchmark (direct vs through the proxy, same run) ==",
          flush=True)
    print(f"  {args.rounds} round(s): {args.n} keep-alive GETs, {args.n_new} new connections, "
          f"1 x 100 MB, {args.n_sse} streams of {SSE_CHUNKS} events {SSE_GAP * 1000:.0f} ms apart "
          "per path and round", flush=True)
    report(run_bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
