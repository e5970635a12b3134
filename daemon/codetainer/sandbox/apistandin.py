"""A stand-in for Anthropic's API, served under its real host name in the test world.

The real Claude Code CLI reaches it the way it reaches the real service: it resolves
``api.anthropic.com`` through the container's allowlist DNS, connects through the
default-deny firewall, and verifies a certificate (issued here by a test CA that the
container trusts through ``NODE_EXTRA_CA_CERTS``). It implements what the CLI was seen to
ask for, and no more:

* ``POST /v1/messages``, streamed (SSE) or not: a scripted reply chosen from the last
  user turn. ``RUN: <command>`` asks for a ``tool_use`` of the Bash tool with that
  command; a turn that carries a ``tool_result`` gets a text reply quoting it; a request
  that is the session namer's (``claude -p``, hooks/session_namer.py) gets a kebab-case
  name; anything else gets ``STANDIN-REPLY: <first 60 chars>``.
  ``FAIL: <status>`` makes it answer that HTTP error (401, 500, 529) with the real
  service's error body and ``x-should-retry: false``.
* the start-up calls (managed settings, policy limits, bootstrap, server URLs, event
  logging, evals): a GET gets the real service's 404 ``not_found_error`` (what an account
  without managed settings or limits gets), a POST an empty object; logged like the rest.

Every request is recorded, one JSON line each, in ``requests.jsonl`` beside the server's
files: method, path, header names, whether an authorization was present and in which
header, and the body (JSON decoded). The token itself is never recorded.

Run it as ``python3 apistandin.py DIR ADDR`` (in the world's namespace); it prints
``listening`` once it accepts. ``make_ca(dir, names)`` writes ``ca.pem`` (trust this),
``server.pem`` and ``server.key``.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HOSTS = ("api.anthropic.com",)
MODEL = "claude-standin-1"
#: how hooks/session_namer.py's prompt starts, and the name the stand-in gives back
NAMER_PROMPT = "Name this coding session."
NAMER_TITLE = "standin-named-session"


def make_ca(directory: Path, names: tuple[str, ...] = HOSTS) -> Path:
    """A throwaway CA and a server certificate for ``names`` (openssl); returns ca.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in
                                  ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
                   "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")

    def ssl_cmd(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ssl_cmd("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj",
            "/CN=codetainer test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ssl_cmd("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}")
    ssl_cmd("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    for p in (ca, cert):
        p.chmod(0o644)
    return ca


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content
                       if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _tool_results(content: Any) -> list[str]:
    out = []
    if isinstance(content, list):
        for b in content:
            if isinstance(b, dict) and b.get("type") == "tool_result":
                c = b.get("content")
                out.append(c if isinstance(c, str) else _text_of(c))
    return out


def plan_reply(body: dict[str, Any]) -> tuple[int, list[dict[str, Any]], str]:
    """(HTTP status, content blocks, stop reason) for a Messages request."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict)
             and m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    results = _tool_results(content)
    if results:
        return 200, [{"type": "text", "text": "TOOL-SAID: " + results[0].strip()[:200]}], \
            "end_turn"
    text = _text_of(content)
    # the CLI may wrap the user's words in reminders: look at the last text block
    blocks = [b for b in content if isinstance(b, dict) and b.get("type") == "text"] \
        if isinstance(content, list) else []
    prompt = blocks[-1]["text"] if blocks else text
    if prompt.startswith(NAMER_PROMPT):  # its context may quote any earlier turn
        return 200, [{"type": "text", "text": NAMER_TITLE}], "end_turn"
    m = re.match(r"FAIL: (\d{3})", prompt)
    if m:
        return int(m.group(1)), [], ""
    m = re.match(r"RUN: (.+)", prompt)
    if m:
        return 200, [{"type": "text", "text": "Running it."},
                     {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}",
                      "name": "Bash", "input": {"command": m.group(1).strip(),
                                                "description": "run the requested command"}}
                     ], "tool_use"
    return 200, [{"type": "text", "text": "STANDIN-REPLY: " + " ".join(prompt.split())[:60]}], \
        "end_turn"


def _error_body(status: int) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            529: "overloaded_error"}.get(
        status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": f"stand-in answered {status}"}}


def sse_events(blocks: list[dict[str, Any]], stop: str, model: str) -> list[tuple[str, Any]]:
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    events: list[tuple[str, Any]] = [("message_start", {
        "type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 1}}})]
    for i, b in enumerate(blocks):
        if b["type"] == "text":
            events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {"type": "text", "text": ""}}))
            events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "text_delta",
                                                             "text": b["text"]}}))
        else:
            events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {**b, "input": {}}}))
            events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "input_json_delta",
                                                             "partial_json": json.dumps(b["input"])}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 20}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "standin"
    log_path: Path

    def log_message(self, *args: Any) -> None:
        pass

    def _record(self, body: Any) -> None:
        auth = self.headers.get("Authorization")
        record = {
            "t": time.time(), "method": self.command, "path": self.path,
            "host": self.headers.get("Host"), "headers": sorted(k.lower() for k in self.headers),
            "auth": ("bearer" if auth and auth.lower().startswith("bearer ") else
                     "other" if auth else ("x-api-key" if self.headers.get("x-api-key") else None)),
            "body": body,
        }
        with _LOCK, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _read_body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if self.headers.get("Content-Encoding") == "gzip":
            import gzip
            raw = gzip.decompress(raw)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return {"_raw": raw[:2000].decode(errors="replace")}

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:20]}")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._record(None)
        # What the real service answers an account with no managed settings or limits
        # (an empty 200 makes the CLI retry its policy-limits fetch four times).
        self._json(404, _error_body(404))

    def do_HEAD(self) -> None:
        self._record(None)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = self._read_body()
        self._record(body)
        path = self.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            self._json(200, {"input_tokens": 100})
            return
        if path != "/v1/messages" or not isinstance(body, dict):
            self._json(200, {})
            return
        status, blocks, stop = plan_reply(body)
        if status != 200:
            # as the real service may say: the client's own retries (ten, with backoff)
            # would hold the turn for a minute; the test wants the error shown now
            self._json(status, _error_body(status), {"x-should-retry": "false"})
            return
        model = str(body.get("model") or MODEL)
        if not body.get("stream"):
            self._json(200, {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message",
                             "role": "assistant", "model": model, "content": blocks,
                             "stop_reason": stop, "stop_sequence": None,
                             "usage": {"input_tokens": 12, "output_tokens": 20}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for name, data in sse_events(blocks, stop, model):
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True


_LOCK = threading.Lock()


def serve(directory: Path, addr: str, port: int = 443) -> None:
    Handler.log_path = directory / "requests.jsonl"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "server.pem", directory / "server.key")
    ctx.set_alpn_protocols(["http/1.1"])
    httpd = ThreadingHTTPServer((addr, port), Handler)
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    print("listening", flush=True)
    httpd.serve_forever()


def requests(directory: Path) -> list[dict[str, Any]]:
    p = directory / "requests.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    os.umask(0o022)
    serve(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 443)
