"""Network isolation as the daemon sees it: boot steps, refresh, status, why/allow.

Boot steps (all fatal, in order; any failure leaves boot FAILED and the agent unstarted):

* ``network-config``: validate the allowlist (every bad line named ``file:line``), load
  ``@github`` ranges, pick the DNS engine and the firewall backend, write the DNS
  server's config and exec script, and install the firewall in its *safe* state:
  default deny, only the allowlisted networks, the dynamic sets empty but present (the
  DNS server writes into them from its first answer). CoreDNS's service is started
  here, before that install, so that its start overlaps it: it serves loopback only and
  nothing queries it before the ``dns`` step's hook listens;
* ``dns``: start the supervised ``dns`` service (a no-op when network-config did) and,
  for CoreDNS, the forwarding hook while it starts, prove it filters with real queries,
  point resolv.conf at it, and put it under the guard that never lets it stay down
  (:mod:`.dnsguard`);
* ``firewall``: resolve every name through it, fill the static sets, start the refresh
  task;
* ``network-selftest``: from the agent's uid, an allowlisted target connects, a denied
  address is refused fast, direct DNS to the upstreams is blocked.

Afterwards nothing here ever takes the firewall down: ``reload`` and temporary grants
re-apply it in one transaction (established connections survive), ``close`` leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt

from codetainer import backoff
from codetainer.boot.engine import BootContext, Policy, Step, StepError
from codetainer.boot.readiness import Check
from codetainer.network import dnscheck, nftprobe, selftest
from codetainer.network.active import AddressNames, Grant, NetworkSetup, RefusedTable
from codetainer.network.allowlist import (
    Allowlist,
    AllowlistError,
    load_allowlist,
)
from codetainer.network.compose import (
    NetOptions,
    NetworkPlan,
    build_policy,
    check_settings,
    dns_exec_script,
    make_plan,
    parse_options,
    write_atomic,
    write_resolv_conf,
)
from codetainer.network.dnsconfig import (
    DnsmasqLogParser,
    Engine,
    detect_engine,
    parse_coredns_log_line,
)
from codetainer.network.dnsguard import DnsGuard
from codetainer.network.dnsstart import HOOK_MODULE, QUERY_MODULE, ServerStart, import_beside
from codetainer.network.firewall import (
    Denied,
    FirewallError,
    Runner,
    SelfTestResult,
    make_backend,
    probe_backend,
)
from codetainer.network.flyenv import fly_environ, gather
from codetainer.network.github_meta import GithubRanges, MetaSource, load_github_ranges
from codetainer.network.ops import NetworkOps
from codetainer.network.refresh import Contents, Refresher
from codetainer.network.setwriter import IpsetWriter, NftSetWriter, SetWriter
from codetainer.network.why import network_status
from codetainer.services.manager import UnknownService

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping, Sequence

    from codetainer.control.server import ControlServer
    from codetainer.events import EventBus
    from codetainer.network.dnscheck import Resolution
    from codetainer.network.dnshook import DnsHook
    from codetainer.services.manager import ServiceManager
    from codetainer.services.process import Service
    from codetainer.settings import Settings
    from codetainer.status import NetworkStatus

log = structlog.get_logger("codetainer.network")

DENIED_POLL_S = 10.0


class NetworkController:
    """Sets the network up and keeps it; implements :class:`.active.ActiveNetwork`, all
    that ``why``, ``allow`` and status read of it."""

    def __init__(self, settings: Settings, events: EventBus, services: ServiceManager) -> None:
        self.settings = settings
        self.events = events
        self.services = services
        self.runner = Runner()
        #: what the network-config step set up: one value, None only before it ran
        self.net: NetworkSetup | None = None
        self.refresher: Refresher | None = None
        self.hook: DnsHook | None = None
        self.set_writer: SetWriter | None = None
        #: called after each re-plan took effect (the proxy renders its policy from it)
        self.on_change: list[Callable[[], object]] = []
        self.ops = NetworkOps(self)
        self.refused = RefusedTable()
        self.addr_names = AddressNames()
        self._parser = DnsmasqLogParser()
        self.denied: list[Denied] = []
        self.denied_at: float | None = None
        self.health: dnscheck.HealthResult | None = None
        self.selftest: SelfTestResult | None = None
        self.guard: DnsGuard | None = None
        self.notes: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listening = False
        #: dnspython, imported in a thread while network-config waits on nft
        self._dns_import: asyncio.Future[object] | None = None
        self._server_start = ServerStart()
        self.health_interval = 15.0
        # At start, so a bad value exits 64; Fly's variables as the daemon got them.
        check_settings(settings)
        self.ipv6_setting = settings.ipv6
        self.fly_env = fly_environ(os.environ)

    # -- boot steps ------------------------------------------------------------------

    def steps(self) -> list[Step]:
        """Boot steps, in order (all fatal): network-config, dns, firewall, network-selftest."""
        return [
            Step("network-config", self._step_config, timeout=60.0, policy=Policy.FATAL,
                 description="validate the allowlist, generate the DNS config, default-deny firewall"),
            Step("dns", self._step_dns, timeout=60.0, policy=Policy.FATAL,
                 requires=("network-config",), description="start the filtering DNS server"),
            Step("firewall", self._step_firewall, timeout=90.0, policy=Policy.FATAL,
                 requires=("dns",), description="resolve the allowlist, fill the allowed sets"),
            Step("network-selftest", self._step_selftest, timeout=60.0, policy=Policy.FATAL,
                 requires=("firewall",), description="prove the firewall from the agent's uid"),
        ]

    def _ready(self) -> NetworkSetup:
        if self.net is None:
            raise StepError("the network-config step has not run", "run the boot steps in order")
        return self.net

    async def _step_config(self, ctx: BootContext) -> str:
        s = self.settings
        try:
            allow = load_allowlist(s.allowlist_file, s.allow)
        except AllowlistError as exc:
            nftprobe.discard()  # started early by codetainerd; not asked now
            lines = [str(p) for p in exc.problems]
            more = f" (and {len(lines) - 10} more)" if len(lines) > 10 else ""
            raise StepError(
                f"invalid allowlist, {len(lines)} problem(s): {'; '.join(lines[:10])}{more}",
                f"fix the named line(s) in {s.allowlist_file} or CODETAINER_ALLOW and restart; "
                "nothing was opened, the agent will not start",
            ) from None
        try:
            fly = await gather(self.fly_env) if self.ipv6_setting == "auto" else None
            opts = parse_options(s, detect_engine(s.dns_engine), fly)
            log.info("network_ipv6_policy", policy=opts.ipv6, reason=opts.ipv6_why)
            self.health_interval = s.dns_health_interval
        except ValueError as exc:
            nftprobe.discard()
            raise StepError(str(exc), "fix the setting and restart") from None
        if self._dns_import is None:
            self._dns_import = import_beside(HOOK_MODULE if opts.hook else QUERY_MODULE)
        github = None
        if allow.github:
            github = await load_github_ranges(s.github_meta_url, opts.run_dir / "github-meta.json")
            if github.source is MetaSource.NONE:
                self.notes["github"] = f"@github ranges unavailable ({github.error}): denied"
        try:
            name = await probe_backend(s.firewall, self.runner,
                                       nat=opts.proxy_port is not None)
            backend = make_backend(name, self.runner)
        except FirewallError as exc:
            raise StepError(str(exc), "the kernel needs nf_tables or ip_tables with ipset") from None
        plan = self._make_plan(allow, opts, backend.name, github)
        self._write_dns(opts, plan)
        if not self._listening:  # before the server's start: its first lines wake the probe
            self.services.add_output_listener("dns", self._on_dns_output)
            self._listening = True
        early = None
        if opts.hook is not None and "dns" in self.services.services:
            # CoreDNS's own start (~30 ms, a Go runtime) runs beside the firewall's apply:
            # it serves only loopback, and nothing queries it (nor it its upstreams)
            # before the dns step's hook listens and probes it
            early = self._dns_service(ctx)
        try:
            # Safe state first: default deny, networks only, dynamic sets present and empty.
            await backend.apply(build_policy(plan, plan.fixed, opts), fresh=True)
        except (FirewallError, ValueError) as exc:
            if early is not None:
                await early.stop_and_wait()  # the boot stops here: not left running
            raise StepError(f"cannot install the firewall: {exc}") from None
        self.net = NetworkSetup(opts, backend, allow, plan, github)
        nets = sum(len(v) for v in plan.fixed.values())
        return (f"{len(plan.names)} names, {len(allow.wildcards)} wildcards, {nets} networks; "
                f"DNS {opts.engine.value}, firewall {backend.name} (default deny), "
                f"IPv6 {opts.ipv6}")

    def _dns_service(self, ctx: BootContext) -> Service:
        """Start the ``dns`` service (starting one that starts or runs is a no-op)."""
        try:
            self.services.get("dns")
        except UnknownService as exc:
            raise StepError(exc.message, "add [program:dns] (command=<run_dir>/dns/exec) to the "
                            "services file") from None
        if "dns" not in ctx.started_by_steps:
            ctx.started_by_steps.append("dns")
        return self.services.start("dns")

    def _make_plan(self, allow: Allowlist, opts: NetOptions, backend: str,
                   github: GithubRanges | None) -> NetworkPlan:
        """The plan of ``allow`` with the temporary grants in force."""
        effective = allow.with_entries(self.ops.active())
        return make_plan(effective, opts, backend, github.networks if github else ())

    def _writer(self) -> SetWriter:
        """The one set writer, the hook's and the revokes'; with the hook it keeps a
        helper process (no process per answer), without it runs the one-shot tool."""
        if self.set_writer is None:
            net = self._ready()
            keep = net.opts.hook is not None
            if net.backend.name == "nftables":
                self.set_writer = NftSetWriter(Runner(timeout=5.0), persistent=keep)
            else:
                self.set_writer = IpsetWriter(Runner(timeout=5.0), net.plan.config.set_timeout,
                                              persistent=keep)
        return self.set_writer

    @staticmethod
    def _write_dns(opts: NetOptions, plan: NetworkPlan) -> bool:
        """Write config and exec script; True when the config changed."""
        changed = write_atomic(opts.config_path, plan.config.text, 0o644)
        write_atomic(opts.exec_path, dns_exec_script(opts), 0o755)
        return changed

    async def _step_dns(self, ctx: BootContext) -> str:
        net = self._ready()
        opts, plan = net.opts, net.plan
        # Started by network-config already for CoreDNS (a no-op then); either way its start
        # runs beside the hook's: nothing queries it before the hook listens (the first
        # query is the start probe, below).
        svc = self._dns_service(ctx)
        if self._dns_import is not None:  # started by network-config
            with contextlib.suppress(Exception):  # the import below raises it
                await self._dns_import
        if opts.hook is not None and self.hook is None:
            from codetainer.network.dnshook import DnsHook, SetRoutes  # dnspython: the hook's
            writer = self._writer()
            hook = DnsHook(opts.hook, opts.upstreams, SetRoutes(plan.domain_sets), writer,
                           allowed=self._allowed_name, sock_uid=opts.dns_uid,
                           on_refused=self.refused.record, on_answer=self._on_hook_answer,
                           screened=plan.config.screened)
            try:
                await hook.start()
            except OSError as exc:
                await svc.stop_and_wait()  # not left forwarding to nothing
                raise StepError(f"cannot start the DNS hook on {opts.hook}: {exc}",
                                "set CODETAINER_DNS_HOOK to a free loopback address:port") from None
            self.hook = hook
            self._spawn("set-helper", writer.prestart())  # beside the DNS server's start
            if isinstance(writer, NftSetWriter) and writer.helper is not None:
                net.backend.set_scripts = writer.helper.apply  # the refreshes' set fills too
        await self._server_start.start(svc, self._start_probe(), opts.listen)
        health = await self._health(attempts=10)
        if not health.ok:
            raise StepError(f"the DNS server does not filter as it must: {health.reason}",
                            self._dns_hint(health))
        try:
            write_resolv_conf(Path(self.settings.resolv_conf), opts.listen)
        except OSError as exc:
            raise StepError(f"cannot write {self.settings.resolv_conf}: {exc}") from None
        if self.guard is None:
            self.guard = DnsGuard(self.services, self.events, lambda t: self._health(timeout=t),
                                  self._restart_dns, interval=self.health_interval)
        self._spawn("dns-guard", self.guard.run())
        return (f"{opts.engine.value} on {opts.listen}: {health.reason} "
                f"({health.latency * 1000:.0f} ms); {self.settings.resolv_conf} points at it")

    def _dns_hint(self, health: dnscheck.HealthResult) -> str:
        """What to look at when the server does not answer an allowlisted name: with the
        hook in the path, which side of it failed."""
        see = "see the dns service's output in `codetainer status`"
        hook = self.hook
        if hook is None or health.answered:
            return see
        where = f"the daemon's DNS hook on {hook.host}:{hook.port}"
        if not hook.counts["queries"]:
            return (f"the DNS server never reached {where}: check CODETAINER_DNS_HOOK and "
                    f"the forward lines of its config; {see}")
        ups = ",".join(u.hostport for u in hook.upstreams)
        return (f"{where} got {hook.counts['queries']} queries, {hook.counts['servfail']} failed: "
                f"check that the upstreams answer (CODETAINER_UPSTREAMS={ups}) and the daemon "
                "log's dns_hook_* events")

    async def _start_dns(self) -> None:
        """Start the ``dns`` service and return as soon as it serves (:mod:`.dnsstart`)."""
        svc = self.services.start("dns")
        await self._server_start.start(svc, self._start_probe(), self._ready().opts.listen)

    def _start_probe(self) -> str:
        """The name a starting DNS server is asked for: the first exact name allowed."""
        names = self._ready().plan.allowlist.names
        return names[0] if names else dnscheck.DENIED_PROBE

    async def _restart_dns(self) -> None:
        svc = self.services.get("dns")
        with self.guard.planned() if self.guard else contextlib.nullcontext():
            await svc.stop_and_wait()
            await self._start_dns()
        health = await self._health(attempts=10)
        if not health.ok:
            log.error("dns_unhealthy_after_restart", reason=health.reason)

    async def _health(self, attempts: int = 1, timeout: float = 2.0) -> dnscheck.HealthResult:
        net = self._ready()
        opts, plan = net.opts, net.plan
        probe = plan.allowlist.names[0] if plan.allowlist.names else None

        async def check() -> dnscheck.HealthResult:
            result = await dnscheck.check_dns(opts.listen, 53, probe or dnscheck.DENIED_PROBE,
                                              timeout=timeout)
            if probe is None:  # only wildcards and networks: the filter is what we can prove
                result = dataclasses.replace(result, answered=True, allowed_rcode="(no exact name)")
            return result

        retrying = AsyncRetrying(stop=stop_after_attempt(attempts),
                                 wait=backoff.exponential(0.2, 2.0),
                                 retry=retry_if_result(lambda r: not r.ok),
                                 retry_error_callback=backoff.last_result)
        result: dnscheck.HealthResult = await retrying(check)
        self.health = result
        if self.guard is not None:
            self.guard.observe(result)
        return result

    async def _step_firewall(self, ctx: BootContext) -> str:
        net = self._ready()
        opts, plan, backend = net.opts, net.plan, net.backend
        self.refresher = Refresher(
            plan.names, self._resolve, self._apply_contents, fixed=plan.fixed,
            min_ttl=opts.min_ttl, max_ttl=opts.max_ttl, grace=opts.grace,
        )
        report = await self.refresher.tick(force=True)
        if report.error and not report.all_failed:
            raise StepError(report.error, "the kernel refused the rules: see the daemon log")
        self._spawn("refresh", self.refresher.run())
        self._spawn("denied", self._poll_denied())
        self._spawn("grants", self.ops.expire())
        nxt = self.refresher.figures()["next_refresh_in_s"]
        note = "; ALL LOOKUPS FAILED, only networks allowed" if report.all_failed else ""
        return (f"{report.ok}/{report.names} names resolved, {report.addresses} addresses allowed "
                f"({backend.name}); next refresh in {nxt}s{note}")

    async def _resolve(self, names: Sequence[str]) -> Mapping[str, Resolution]:
        opts = self._ready().opts
        return await dnscheck.resolve_all(names, opts.listen, 53, timeout=2.0,
                                          ipv6=opts.ipv6 == "allowlist", concurrency=64)

    async def _apply_contents(self, contents: Contents) -> None:
        net = self._ready()
        opts, plan, backend = net.opts, net.plan, net.backend
        await backend.update_sets(build_policy(plan, contents, opts))

    async def _step_selftest(self, ctx: BootContext) -> str:
        net = self._ready()
        opts, plan = net.opts, net.plan
        self.selftest, text = await selftest.run(self.settings, opts, plan)
        return text

    # -- readiness -------------------------------------------------------------------

    def readiness_checks(self) -> list[Any]:
        """readiness.Check objects: DNS answers, firewall rules present + self-test passed."""
        return [Check("dns", Policy.FATAL, self._check_dns, timeout=6.0),
                Check("firewall", Policy.FATAL, self._check_firewall, timeout=10.0)]

    @staticmethod
    def _selected(ctx: BootContext) -> bool:
        return ctx.daemon is None or "network-config" in ctx.daemon.engine.records

    async def _check_dns(self, ctx: BootContext) -> str:
        if not self._selected(ctx):
            return "network steps not selected"
        health = await self._health(attempts=3)
        if not health.ok:
            raise StepError(health.reason)
        return health.reason

    async def _check_firewall(self, ctx: BootContext) -> str:
        if not self._selected(ctx):
            return "network steps not selected"
        backend = self._ready().backend
        st = await backend.status()
        if not st.active:
            raise StepError(f"firewall not installed: {st.detail}")
        if self.selftest is None or not self.selftest.ok:
            raise StepError("the network self-test has not passed")
        return f"{backend.name} active"

    # -- background tasks ------------------------------------------------------------

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        old = self._tasks.get(name)
        if old is not None and not old.done():
            coro.close()
            return
        self._tasks[name] = asyncio.create_task(coro, name=f"network:{name}")

    async def _poll_denied(self) -> None:
        while True:
            await self.read_denied()
            await asyncio.sleep(DENIED_POLL_S)

    async def read_denied(self) -> list[Denied]:
        if self.net is None:
            return []
        try:
            self.denied = await self.net.backend.read_denied()
            self.denied_at = time.time()
        except (FirewallError, ValueError) as exc:
            log.debug("denied_read_failed", error=str(exc)[:200])
        return self.denied

    def _on_dns_output(self, stream: str, line: str) -> None:
        self._server_start.heard()
        if self.net is not None and self.net.opts.engine is Engine.COREDNS:
            q = parse_coredns_log_line(line)
        else:
            q = self._parser.feed(line)
            if q is None:
                self.addr_names.feed_dnsmasq(line)
        if q is not None:
            self.refused.record(q.name, q.client, q.qtype)

    def _on_hook_answer(self, name: str, addrs: list[str]) -> None:
        for a in addrs:
            self.addr_names.record(a, name)

    def effective(self) -> Allowlist:
        return self.net.plan.allowlist if self.net is not None else Allowlist()

    @property
    def grants(self) -> Mapping[str, Grant]:
        return self.ops.grants

    def degraded(self) -> str | None:
        """Status ``degraded`` and the daemon's probe for it, one reading: the DNS guard's
        trouble, else the refresh's, else missing ``@github`` ranges."""
        if self.net is None:
            return None
        return ((self.guard.degraded if self.guard else None)
                or (self.refresher.degraded if self.refresher else None) or self.notes.get("github"))

    def _allowed_name(self, name: str) -> bool:
        return self.effective().match(name) is not None

    # -- reload and grants -----------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the allowlist and apply it without dropping established connections."""
        if self.refresher is None or self.net is None:
            return {"skipped": "the network is not set up (its boot steps did not complete)"}
        net = self.net
        try:
            allow = load_allowlist(self.settings.allowlist_file, self.settings.allow)
        except AllowlistError as exc:
            log.error("network_reload_failed", error=str(exc)[:2000])
            return {"ok": False, "error": f"allowlist invalid, nothing changed: {exc}"}
        if allow.github:
            net.github = await load_github_ranges(
                self.settings.github_meta_url, net.opts.run_dir / "github-meta.json")
        result = await self.rebuild("reload", allow)
        log.info("network_reloaded", **result)
        return result

    async def rebuild(self, reason: str, allow: Allowlist | None = None) -> dict[str, Any]:
        """New plan -> firewall shape -> DNS config (restart if changed) -> resolve -> sets."""
        net = self._ready()
        if self.refresher is None:
            raise StepError("the firewall step has not run", "run the boot steps in order")
        refresher = self.refresher
        async with refresher.lock:
            old_plan, old_base = net.plan, net.base
            net.base = allow or net.base
            plan = self._make_plan(net.base, net.opts, net.backend.name, net.github)
            before = set(refresher.names)
            seen = {n: set(st.seen) for n, st in refresher.names.items()}
            net.plan = plan
            refresher.update(plan.names, plan.fixed)
            try:
                # The new shape first: new dynamic sets exist before the DNS server names them.
                await self._apply_contents(refresher.contents())
            except (FirewallError, ValueError) as exc:
                net.plan, net.base = old_plan, old_base
                refresher.update(old_plan.names, old_plan.fixed)
                log.error("network_rebuild_failed", reason=reason, error=str(exc)[:500])
                return {"ok": False, "error": f"firewall update failed, nothing changed: {exc}"}
            for notify in self.on_change:
                notify()
            dns_changed = self._write_dns(net.opts, plan)
            if self.hook is not None:
                from codetainer.network.dnshook import SetRoutes

                self.hook.routes = SetRoutes(plan.domain_sets)
                self.hook.screened = plan.config.screened
            restart_error = None
            if dns_changed:
                try:
                    await self._restart_dns()
                except StepError as exc:  # the supervisor keeps retrying; say so
                    restart_error = exc.reason
                    log.error("dns_restart_failed", reason=exc.reason)
            # After the restart: the old server could still hand the names out until then.
            await self._revoke(old_plan, plan, seen, refresher.contents())
            names = list(plan.names) if reason == "reload" else [n for n in plan.names if n not in before]
            report = await refresher.tick_locked(names, force=True)
        added = sorted(set(plan.names) - before)
        removed = sorted(before - set(plan.names))
        return {"ok": report.error is None or report.all_failed, "reason": reason,
                "dns_restarted": dns_changed, "names": len(plan.names), "added": added,
                "removed": removed, "addresses": report.addresses,
                "error": restart_error or report.error}

    async def _revoke(self, old: NetworkPlan, new: NetworkPlan, seen: dict[str, set[str]],
                      contents: Contents) -> None:
        """Take the addresses of names that are no longer allowed out of the dynamic sets
        too (the static sets lost them already), unless another entry still allows them."""
        keep = {a for addrs in contents.values() for a in addrs}
        gone: set[str] = set()
        for name in set(seen) - set(new.names):
            gone |= seen[name]
        for addr, (name, _) in self.addr_names.rows.items():
            if new.allowlist.match(name) is None:
                gone.add(addr)
        gone -= keep
        if not gone:
            return
        sets = {s for group in old.domain_sets.values() for s in group}
        elements = {s: sorted(a for a in gone if (":" in a) == (s[1] == "6")) for s in sets}
        try:
            await self._writer().remove(elements)
        except (FirewallError, ValueError) as exc:
            log.error("network_revoke_failed", error=str(exc)[:300])
            return
        log.info("network_revoked", addresses=sorted(gone)[:50], count=len(gone))

    # -- control ---------------------------------------------------------------------

    def register(self, control: ControlServer) -> None:
        """Register control ops: ``why`` (open to all), ``allow`` (root only)."""
        control.register("why", self.ops.op_why)
        control.register("allow", self.ops.op_allow, privileged=True)

    # -- status ----------------------------------------------------------------------

    def status(self) -> NetworkStatus:
        """The ``network`` section of status (data: the CLI renders it)."""
        return network_status(self)

    async def close(self) -> None:
        """Stop background tasks. The firewall stays in place (fail closed)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        nftprobe.discard()
        if self.hook is not None:
            await self.hook.close()
            self.hook = None
        if self.set_writer is not None:
            await self.set_writer.close()

