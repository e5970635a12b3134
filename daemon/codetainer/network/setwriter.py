"""Writers that put DNS answers into the firewall's dynamic sets, one transaction per call.

The DNS hook (:mod:`.dnshook`) awaits :meth:`SetWriter.add` before it replies, so an
address is never handed out before it is allowed. Two layers keep that cheap:

* :class:`BatchedWriter`: concurrent ``add`` calls share one transaction;
* :class:`SetHelper`: the transaction goes to a persistent helper process
  (:mod:`.sethelper`: libnftables, or ipset's netlink protocol) over a pipe, not to a new
  ``nft``/``ipset`` process: ~0.2 ms instead of ~16 ms (nft) or ~3 ms (ipset) a
  transaction, so a client that asks one name at a time is no longer held to ~55-80
  answers a second (``bench/bench_dnshook.py``).

The helper answers a request only once the kernel has acknowledged the transaction, so
the ordering guarantee is the one-shot tool's. A helper that dies is started again (the
transaction it did not answer is retried once on the new one: every script here is
idempotent); one that cannot start is retried with a backoff, and meanwhile each
transaction runs the one-shot tool (``nft -f -``, ``ipset restore``) as before: slower,
never unwritten. A helper that does not answer in time is killed and the transaction
fails (the hook answers SERVFAIL, the client retries).
"""

from __future__ import annotations

import asyncio
import re
import struct
import sys
import time
from collections.abc import Mapping, Sequence

import structlog

from codetainer import backoff
from codetainer.network import model
from codetainer.network.firewall import FirewallError, Runner, parse_address, rendered

log = structlog.get_logger("codetainer.network")

#: a dynamic set's name (``d4_80_443``): what a script may name, nothing else
SET_NAME = re.compile(r"[ds][46]_[0-9_]{1,90}\Z")

HELPER_MODULE = "codetainer.network.sethelper"
#: what a transaction runs when the helper cannot: the one-shot tool, script on stdin
ONESHOT: dict[str, tuple[str, ...]] = {"nft": ("nft", "-f", "-"), "ipset": ("ipset", "restore")}
#: seconds a new helper has to say it is ready (it takes ~20 ms; CoreDNS gives the hook
#: 5 s in all for an answer)
START_TIMEOUT = 5.0
#: seconds before another start after the n-th consecutive loss: 0 (the first loss is
#: restarted at once), then 1, 2, 4 ... up to MAX_BACKOFF
MAX_BACKOFF = 60.0


class SetWriter:
    """Adds addresses to dynamic sets, one transaction per call."""

    async def add(self, elements: Mapping[str, Sequence[str]]) -> None:
        raise NotImplementedError

    async def remove(self, elements: Mapping[str, Sequence[str]]) -> None:
        """Take addresses out (a grant expired, a name left the allowlist)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the writer holds (its helper process); it may be used again."""

    async def prestart(self) -> None:
        """Be ready for the first transaction now (its helper process started) rather than
        at it: started beside the DNS server, the first answer does not wait ~40 ms for
        the helper. Failing here is what failing at the first use would be."""


def checked(elements: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``{set: sorted addresses}``, every set name and address validated (a script is
    rendered from these, so nothing else may reach it)."""
    out: dict[str, list[str]] = {}
    for name, addrs in elements.items():
        if not SET_NAME.match(name):
            raise ValueError(f"refusing set name {name[:40]!r}")
        if addrs:
            out[name] = sorted({rendered(parse_address(a)) for a in addrs})
    return out


class BatchedWriter(SetWriter):
    """Concurrent ``add`` calls share one transaction: while one runs, the next batch
    gathers, and each caller returns only once the transaction holding its elements has
    been applied (or raises its error). A refresh of 1,000 names through the hook is then
    a few transactions, not one per answer (measured: README, Benchmarks)."""

    def __init__(self, inner: SetWriter) -> None:
        self.inner = inner
        self._pending: dict[str, set[str]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: transactions run (the tests read it)
        self.transactions = 0

    async def add(self, elements: Mapping[str, Sequence[str]]) -> None:
        if not any(elements.values()):
            return
        for name, addrs in elements.items():
            self._pending.setdefault(name, set()).update(addrs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._waiters:
            batch = {name: sorted(addrs) for name, addrs in self._pending.items()}
            waiters, self._pending, self._waiters = self._waiters, {}, []
            error: BaseException | None = None
            try:
                await self.inner.add(batch)
                self.transactions += 1
            except Exception as exc:
                error = exc
            for w in waiters:
                if not w.done():  # a caller that was cancelled meanwhile
                    if error is None:
                        w.set_result(None)
                    else:
                        w.set_exception(error)

    async def remove(self, elements: Mapping[str, Sequence[str]]) -> None:
        await self.inner.remove(elements)

    async def close(self) -> None:
        await self.inner.close()

    async def prestart(self) -> None:
        await self.inner.prestart()


class _Lost(Exception):
    """The helper is gone (exited, pipe closed) before it answered."""


class SetHelper:
    """One persistent helper process (:mod:`.sethelper`) applying scripts for ``engine``
    (``nft`` or ``ipset``), one at a time; started on first use, with ``runner.wrap`` in
    front (tests: ``ip netns exec NS``) and ``runner.timeout`` per transaction.

    States: no helper -> starting -> serving -> (lost) -> no helper; ``down_until`` says
    when the next start may be tried after a loss, and until then transactions run the
    one-shot tool. The figures are read by the bench and the tests."""

    def __init__(self, engine: str, runner: Runner) -> None:
        if engine not in ONESHOT:
            raise ValueError(f"no set helper for {engine!r}: use one of {sorted(ONESHOT)}")
        self.engine = engine
        self.runner = runner
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        #: monotonic time before which no start is tried (after a loss)
        self.down_until = 0.0
        #: consecutive losses (a start that failed, a helper that died); 0 after a success
        self.failures = 0
        self.starts = 0
        self.transactions = 0
        #: the last request's number (its answer must carry it)
        self._number = 0
        #: transactions that ran the one-shot tool instead
        self.oneshots = 0

    async def apply(self, script: str, what: str) -> None:
        """Apply one script; returns once the kernel has it, raises FirewallError if not."""
        async with self._lock:
            for _ in range(2):  # a helper lost mid-transaction: once more, on a new one
                proc = await self._ready()
                if proc is None:
                    break
                try:
                    status, message = await self._call(proc, script, what)
                except _Lost as exc:
                    await self._lose(f"lost during a transaction: {exc}")
                    continue
                if status != 0:
                    raise FirewallError(f"{what} failed: {message[:2000]}; check that the "
                                        "sets exist (`codetainer status`) and the daemon log")
                self.failures = 0
                self.transactions += 1
                return
            self.oneshots += 1
            await self.runner.run(list(ONESHOT[self.engine]), script, what=what)

    async def prestart(self) -> None:
        """Start the helper unless it serves (or may not be started yet, after a loss)."""
        async with self._lock:
            await self._ready()

    async def close(self) -> None:
        """End the helper (end of input, then SIGKILL after 2 s); a later ``apply`` starts
        a new one."""
        async with self._lock:
            proc, self.proc = self.proc, None
            if proc is None:
                return
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                async with asyncio.timeout(2.0):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def _ready(self) -> asyncio.subprocess.Process | None:
        """The serving helper, a new one, or None while it cannot be had."""
        if self.proc is not None:
            if self.proc.returncode is None:
                return self.proc
            await self._lose(f"exited ({self.proc.returncode}) while idle")
        if time.monotonic() < self.down_until:
            return None
        argv = [*self.runner.wrap, sys.executable, "-I", "-B", "-m", HELPER_MODULE, self.engine]
        try:
            # its own session: a terminal's ^C to the daemon's group does not reach it;
            # it ends when the daemon closes (or, dying, drops) the pipe
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            await self._lose(f"cannot start {argv[0]}: {exc}")
            return None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                status, message = await self._frame(self.proc, 0)
        except (TimeoutError, _Lost) as exc:
            await self._lose(f"did not start: {exc or 'no answer'}")
            return None
        except BaseException:  # cancelled before it said it was ready: never half-started
            await self._lose("start cancelled")
            raise
        if status != 0:
            await self._lose(message)
            return None
        self.starts += 1
        log.info("set_helper_started", engine=self.engine, pid=self.proc.pid, starts=self.starts)
        return self.proc

    async def _call(self, proc: asyncio.subprocess.Process, script: str, what: str) -> tuple[int, str]:
        assert proc.stdin is not None
        data = script.encode()
        self._number = self._number % 0xFFFFFFFF + 1
        try:
            proc.stdin.write(struct.pack("!II", self._number, len(data)) + data)
            async with asyncio.timeout(self.runner.timeout):
                await proc.stdin.drain()
                return await self._frame(proc, self._number)
        except _Lost:
            raise
        except ConnectionError as exc:  # the pipe broke: it exited
            raise _Lost(f"{type(exc).__name__}: {exc}") from None
        except TimeoutError:
            await self._lose(f"no answer within {self.runner.timeout:.0f}s")
            raise FirewallError(f"the set helper did not apply {what} within "
                                f"{self.runner.timeout:.0f}s: the kernel or the helper is "
                                "stuck; it was killed and the next transaction starts a new one "
                                "(check `dmesg`)") from None
        except BaseException:  # cancelled mid-frame: the stream is out of step, end it
            await self._lose("transaction cancelled")
            raise

    @staticmethod
    async def _frame(proc: asyncio.subprocess.Process, number: int) -> tuple[int, str]:
        """The answer to request ``number`` (0: the greeting)."""
        assert proc.stdout is not None
        try:
            got, status, size = struct.unpack("!IiI", await proc.stdout.readexactly(12))
            message = (await proc.stdout.readexactly(size)).decode(errors="replace")
        except asyncio.IncompleteReadError:
            code = await proc.wait()
            raise _Lost(f"the helper exited ({code})") from None
        if got != number:  # never take another request's answer for this one's
            raise _Lost(f"answer {got} to request {number}: out of step")
        return status, message

    async def _lose(self, reason: str) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
        if proc is not None:
            await proc.wait()
        self.failures += 1
        # the first loss is restarted at once: the next start is the first retry
        delay = backoff.delay(self.failures - 1, 1.0, MAX_BACKOFF)
        self.down_until = time.monotonic() + delay
        log.warning("set_helper_lost", engine=self.engine, reason=reason[:500],
                    failures=self.failures, retry_in_s=delay)


class _ScriptWriter(SetWriter):
    """Renders scripts; applies each through the helper (``persistent``) or one run of
    the one-shot tool."""

    engine = ""

    def __init__(self, runner: Runner | None = None, *, persistent: bool = True) -> None:
        self.runner = runner or Runner(timeout=5.0)
        self.helper = SetHelper(self.engine, self.runner) if persistent else None

    async def _apply(self, script: str, what: str) -> None:
        if not script:
            return
        if self.helper is not None:
            await self.helper.apply(script, what)
        else:
            await self.runner.run(list(ONESHOT[self.engine]), script, what=what)

    async def close(self) -> None:
        if self.helper is not None:
            await self.helper.close()

    async def prestart(self) -> None:
        if self.helper is not None:
            await self.helper.prestart()


class NftSetWriter(_ScriptWriter):
    engine = "nft"

    @staticmethod
    def render(elements: Mapping[str, Sequence[str]]) -> str:
        t = f"{model.FAMILY} {model.TABLE}"
        lines: list[str] = []
        for name, addrs in checked(elements).items():
            body = ", ".join(addrs)
            # add (no-op if present), delete, add: the element's timeout starts again, and
            # inside one transaction no packet ever sees it missing.
            lines += [f"add element {t} {name} {{ {body} }}",
                      f"delete element {t} {name} {{ {body} }}",
                      f"add element {t} {name} {{ {body} }}"]
        return "\n".join(lines) + "\n" if lines else ""

    @staticmethod
    def render_remove(elements: Mapping[str, Sequence[str]]) -> str:
        t = f"{model.FAMILY} {model.TABLE}"
        lines: list[str] = []
        for name, addrs in checked(elements).items():
            body = ", ".join(addrs)
            # add first, so the delete cannot fail on an element that is not there
            lines += [f"add element {t} {name} {{ {body} }}", f"delete element {t} {name} {{ {body} }}"]
        return "\n".join(lines) + "\n" if lines else ""

    async def add(self, elements: Mapping[str, Sequence[str]]) -> None:
        await self._apply(self.render(elements), "add DNS answers to the sets")

    async def remove(self, elements: Mapping[str, Sequence[str]]) -> None:
        await self._apply(self.render_remove(elements), "remove addresses from the dynamic sets")


class IpsetWriter(_ScriptWriter):
    engine = "ipset"

    def __init__(self, runner: Runner | None = None, timeout: int = 660, *,
                 persistent: bool = True) -> None:
        super().__init__(runner, persistent=persistent)
        self.timeout = int(timeout)

    def render(self, elements: Mapping[str, Sequence[str]]) -> str:
        lines = [f"add {model.ipset_name(name)} {a} timeout {self.timeout} -exist"
                 for name, addrs in checked(elements).items() for a in addrs]
        return "\n".join(lines) + "\n" if lines else ""

    @staticmethod
    def render_remove(elements: Mapping[str, Sequence[str]]) -> str:
        lines = [f"del {model.ipset_name(name)} {a} -exist"
                 for name, addrs in checked(elements).items() for a in addrs]
        return "\n".join(lines) + "\n" if lines else ""

    async def add(self, elements: Mapping[str, Sequence[str]]) -> None:
        await self._apply(self.render(elements), "add DNS answers to the ipsets")

    async def remove(self, elements: Mapping[str, Sequence[str]]) -> None:
        await self._apply(self.render_remove(elements), "remove addresses from the dynamic ipsets")
