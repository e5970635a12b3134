"""The daemon's one HTTP(S) client: a GET in its own short-lived interpreter.

The daemon makes a handful of requests a boot (GitHub's API for the fork's upstream and
the proxy's repository node IDs, GitHub's meta ranges with ``@github``). urllib's HTTPS
would bring ``ssl``, libssl and libcrypto (~6 MiB) into the long-lived daemon for them,
so each runs in ``python3 -I -S`` (the standard library only, through the one runner:
own process group, deadline, killed with its group), which exits with them. A token
comes on the child's stdin, never in its arguments; the body comes back on its stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from codetainer import runner

_CHILD = r"""
import json, sys, urllib.error, urllib.request
url, timeout, limit, headers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
token = sys.stdin.read()
if token:
    headers["Authorization"] = "Bearer " + token
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        body = resp.read(limit + 1)
except urllib.error.HTTPError as exc:
    sys.stderr.write("HTTP Error %s: %s" % (exc.code, exc.reason))
    exc.close()
    sys.exit(3)
except (OSError, ValueError) as exc:
    sys.stderr.write(str(exc) or type(exc).__name__)
    sys.exit(4)
if len(body) > limit:
    sys.stderr.write("response larger than %d bytes" % limit)
    sys.exit(4)
sys.stdout.buffer.write(body)
"""


async def get(url: str, *, timeout: float, headers: Mapping[str, str], token: str = "",
              limit: int = 1 << 20) -> str:
    """The body of ``GET url`` (decoded as UTF-8). OSError says why there is none: the
    server unreachable, an HTTP error (``HTTP Error 404: Not Found``), a body over
    ``limit`` bytes; TimeoutError when no answer came within ``timeout``."""
    import json

    argv = [sys.executable, "-I", "-S", "-c", _CHILD, url, str(timeout), str(limit),
            json.dumps(dict(headers))]
    try:
        done = await runner.run(argv, timeout=timeout + 5, input=token.encode())
    except runner.SpawnError as exc:
        raise OSError(f"cannot run the HTTP client: {exc}") from None
    if done.timed_out:
        raise TimeoutError(f"no answer from {url[:80]} within {timeout:g}s")
    if done.code != 0:
        raise OSError(done.stderr.strip()[-300:] or f"the HTTP client failed ({done.exit})")
    return done.stdout
