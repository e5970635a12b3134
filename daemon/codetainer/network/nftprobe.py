"""The nftables probe: one transaction that creates a table with every nf_tables feature
the firewall uses, then deletes it; ``nft`` exits 0 when the kernel has them all.

Deleting a table makes the kernel's commit wait out an RCU grace period (~15 ms), so
codetainerd's entrypoint starts the probe (:func:`start_early`) before the daemon's
imports, which it then runs beside; the ``network-config`` step takes its answer
(:func:`collect`) where it would otherwise run it. Standard library only at module
level: the entrypoint imports this before anything heavy.
"""

from __future__ import annotations

import shutil
import subprocess

PROBE_TABLE = "codetainer_probe"
PROBE_RULES = f"""\
add table inet {PROBE_TABLE}
add set inet {PROBE_TABLE} s {{ type ipv4_addr; flags interval; }}
add set inet {PROBE_TABLE} d {{ type ipv4_addr; flags timeout; timeout 60s; }}
add set inet {PROBE_TABLE} n {{ type ipv6_addr . inet_proto . inet_service; \
flags dynamic,timeout; timeout 60s; counter; size 16; }}
add chain inet {PROBE_TABLE} c {{ type filter hook output priority filter; policy accept; }}
add rule inet {PROBE_TABLE} c ct direction original ct state established,related accept
add rule inet {PROBE_TABLE} c meta skuid 0 ip daddr @s accept
add rule inet {PROBE_TABLE} c ip6 daddr . meta l4proto . th dport @n counter
add rule inet {PROBE_TABLE} c meta l4proto tcp update @n {{ ip6 daddr . meta l4proto . th dport }}
add rule inet {PROBE_TABLE} c meta l4proto tcp ip6 daddr ::2 reject with tcp reset
add rule inet {PROBE_TABLE} c ip6 daddr ::2 reject with icmpx type admin-prohibited
add rule inet {PROBE_TABLE} c meta skuid 0 ip6 daddr ::2 udp dport 53 meta length > 99 drop
add rule inet {PROBE_TABLE} c meta skuid 0 th dport 53 limit rate over 9/second burst 9 packets drop
"""
#: the policy proxy's redirect (nat): nf_nat and nft_redir
PROBE_NAT = f"""\
add chain inet {PROBE_TABLE} r {{ type nat hook output priority -100; policy accept; }}
add rule inet {PROBE_TABLE} r meta skuid 0 tcp dport {{ 80, 443 }} ip daddr @s redirect to :3129
"""


def script(nat: bool) -> str:
    """The whole transaction; it deletes what it created: nothing is left behind."""
    return PROBE_RULES + (PROBE_NAT if nat else "") + f"delete table inet {PROBE_TABLE}\n"


#: the probe :func:`start_early` started: (its ``nat``, the process)
_early: tuple[bool, subprocess.Popen[bytes]] | None = None


def start_early(firewall: str, nat: bool) -> None:
    """Start the probe now, when ``CODETAINER_FIREWALL`` leaves the choice to it
    (``auto``) and nft is installed; otherwise, or when it cannot start, the step probes
    as it would have."""
    global _early
    if _early is not None or firewall != "auto" or shutil.which("nft") is None:
        return
    try:
        proc = subprocess.Popen(["nft", "-f", "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                close_fds=True, start_new_session=True)
    except OSError:
        return
    assert proc.stdin is not None
    try:
        with proc.stdin:
            proc.stdin.write(script(nat).encode())
    except OSError:
        pass  # it exited before reading: its exit code and stderr say why
    _early = (nat, proc)


async def collect(nat: bool, timeout: float) -> tuple[int, str] | None:
    """The early probe's exit code and stderr, once; None when none was started for
    ``nat`` or it did not end within ``timeout`` seconds (killed): probe now."""
    global _early
    early, _early = _early, None
    if early is None:
        return None
    import asyncio

    from codetainer.runner import ExitWatch, reap

    started_for, proc = early
    watch = ExitWatch(proc.pid)  # not reaped yet: it exists
    try:
        await asyncio.wait_for(asyncio.shield(watch.exited), timeout)
    except BaseException as exc:  # timed out, or the step was cancelled: it ends now
        watch.close()
        _end(proc)
        if isinstance(exc, TimeoutError):
            return None
        raise
    watch.close()
    status = reap(proc)
    assert proc.stderr is not None
    with proc.stderr:
        err = proc.stderr.read().decode(errors="replace")  # it exited: EOF
    if started_for != nat or status is None or proc.returncode is None or proc.returncode < 0:
        return None
    return proc.returncode, err


def discard() -> None:
    """The step will not probe (it failed before, or the daemon stops): end and reap the
    early probe, if one is left."""
    global _early
    early, _early = _early, None
    if early is not None:
        _end(early[1])


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill and reap (at once: SIGKILL) a probe not waited for."""
    import contextlib
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
