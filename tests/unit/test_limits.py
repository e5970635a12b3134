"""The agent's limits: settings, the exec chain, cgroup paths and setup, OOM reporting.

The cgroup trees here are plain directories shaped like cgroupfs (the kernel's files made
by the test); where the kernel's rules matter (cgroup v2's "no internal processes"), a
small writer stands in for it. The real thing runs in tests/integration/test_limits.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from codetainer.boot import chain
from codetainer.boot.filesystem import MountEntry, mounts
from codetainer.boot.privileges import JOIN, AgentUser, ExecLimits, setpriv_argv
from codetainer.cli.render import render_limits
from codetainer.limits import cgroup
from codetainer.limits.cgroup import AgentCgroup, CgroupError, Hierarchy
from codetainer.limits.controller import has_cap_sys_resource
from codetainer.limits.oom import OomWatch, oom_kill_victim, vmstat_oom_kills
from codetainer.limits.plan import LimitSettings, settings_exec_limits
from codetainer.settings import Settings, SettingsError

USER = AgentUser("claude", 1000, 1000, "/home/claude")
GIB = 1 << 30


def limits(**kw: str) -> LimitSettings:
    return LimitSettings.parse(Settings(**kw))


# -- settings ----------------------------------------------------------------------------------

def test_defaults() -> None:
    lim = limits()
    assert (lim.memory_percent, lim.memory_bytes, lim.pids, lim.nice, lim.cpu_weight) == \
        (75, None, 4096, 10, 20)
    assert lim.memory_for(4 * GIB) == 3 * GIB
    assert lim.cpu_shares == 204  # v1's 1024 is v2's 100
    assert settings_exec_limits(Settings()) == ExecLimits(1000, 10, 4096, ())


@pytest.mark.parametrize(("name", "raw"), [
    ("agent_memory", "lots"), ("agent_memory", "0"), ("agent_memory", "101%"),
    ("agent_memory", "63m"), ("agent_memory", "3 g"), ("agent_pids", "63"),
    ("agent_pids", "many"), ("agent_nice", "-1"), ("agent_nice", "20"),
    ("agent_cpu_weight", "0"), ("agent_cpu_weight", "10001")])
def test_a_bad_setting_names_its_variable(name: str, raw: str) -> None:
    # Checked once when the settings are parsed (codetainerd exits 64 with this line),
    # before the limits step or any agent process could see the value.
    with pytest.raises(SettingsError, match=f"CODETAINER_{name.upper()}=") as err:
        Settings.from_env({f"CODETAINER_{name.upper()}": raw})
    assert err.value.variable == f"CODETAINER_{name.upper()}" and err.value.raw == raw
    assert "set it to" in str(err.value)


def test_memory_sizes_and_the_share_kept_for_the_daemon() -> None:
    assert limits(agent_memory="3g").memory_for(16 * GIB) == 3 * GIB
    assert limits(agent_memory="3g").memory_for(2 * GIB) == int(2 * GIB * 0.9)
    assert limits(agent_memory="2048m").memory_bytes == 2 * GIB
    assert limits(agent_memory="50%").memory_for(4 * GIB) == 2 * GIB


def test_pids_stay_below_a_limit_the_container_already_has() -> None:
    lim = limits(agent_pids="4096")
    assert lim.pids_for(None) == 4096
    assert lim.pids_for(10_000) == 4096
    assert lim.pids_for(4096) == 4096 - 128
    assert lim.pids_for(400) == 300  # a quarter kept when the container's limit is small


def test_rlimit_is_the_setting_alone_and_a_backstop_beside_a_pids_cgroup() -> None:
    lim = limits(agent_pids="200")
    assert lim.exec_limits().nproc == 200
    assert lim.exec_limits(("/c/cgroup.procs",), pids_cgroup=True) == \
        ExecLimits(1000, 10, 400, ("/c/cgroup.procs",))


# -- the exec chain --------------------------------------------------------------------------

def test_chain_order_root_first_then_the_drop_then_the_rlimit() -> None:
    argv = setpriv_argv(USER, ["tmux", "ls"], ExecLimits(1000, 10, 300, ("/cg/m/agent/cgroup.procs",
                                                                     "/cg/p/agent/cgroup.procs")))
    assert argv[:8] == ["/bin/sh", "-c", JOIN, "codetainer-limits", "1000",
                        "/cg/m/agent/cgroup.procs", "/cg/p/agent/cgroup.procs", "--"]
    setpriv = next(i for i, a in enumerate(argv) if a.endswith("setpriv"))
    loader = argv.index(chain.native_loader() or "")  # codetainer-seccomp HEX [limits] -- argv
    # the rlimit (and nice) after the drop, set by the loader as the agent: set before
    # it, setpriv's exec fails at the uid's limit
    assert 7 < setpriv < loader
    assert argv[loader + 2:] == ["--nproc=300", "--core=0", "--nice=10", "--", "tmux", "ls"]
    assert "--reuid=1000" in argv[setpriv:loader] and "--bounding-set=-all" in argv
    assert not any(a.endswith(("/nice", "/prlimit")) for a in argv)  # no exec of their own


def test_chain_without_nice_or_cgroup() -> None:
    argv = setpriv_argv(USER, ["x"], ExecLimits(1000, 0, 64, ()))
    assert argv[4:6] == ["1000", "--"] and not any(a.startswith("--nice") for a in argv)


def test_limits_from_the_daemon_are_checked_before_attach_uses_them() -> None:
    good = ExecLimits(1000, 10, 400, ("/sys/fs/cgroup/pids/agent/cgroup.procs",))
    assert ExecLimits.from_dict(good.as_dict()) == good
    assert ExecLimits.from_dict(None) == ExecLimits()  # an older daemon: the defaults
    for bad in ({**good.as_dict(), "nproc": "400"},
                {**good.as_dict(), "cgroup_procs": ["/etc/passwd"]},
                {**good.as_dict(), "cgroup_procs": ["/sys/../etc/cgroup.procs"]},
                {**good.as_dict(), "cgroup_procs": ["relative/cgroup.procs"]}):
        with pytest.raises(ValueError):
            ExecLimits.from_dict(bad)


# -- finding our cgroup ----------------------------------------------------------------------

def mountinfo(tmp_path: Path, *lines: str) -> list[MountEntry]:
    f = tmp_path / "mountinfo"
    f.write_text("".join(f"{i} 1 0:{i} {ln}\n" for i, ln in enumerate(lines, 30)))
    return mounts(str(f))


DOCKER_V1 = "4:memory:/docker/ab\n8:pids:/docker/ab\n1:cpu,cpuacct:/docker/ab\n0::/\n"


def test_v1_as_a_container_runtime_binds_it(tmp_path: Path) -> None:
    ms = mountinfo(
        tmp_path,
        "/ /sys/fs/cgroup ro,nosuid - tmpfs tmpfs rw",
        "/docker/ab /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory",
        "/docker/ab /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids",
        "/docker/ab /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct",
        "/ /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw")
    hs = {h.mountpoint: h for h in cgroup.discover(DOCKER_V1, ms)}
    assert hs["/sys/fs/cgroup/memory"].own_dir == "/sys/fs/cgroup/memory"
    assert hs["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert hs["/sys/fs/cgroup/unified"].version == 2
    version, chosen = cgroup.choose(hs.values())
    assert version == 1
    assert {c: h.mountpoint for c, h in chosen.items()} == {
        "memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids",
        "cpu": "/sys/fs/cgroup/cpu,cpuacct"}


@pytest.mark.parametrize(("root", "own", "expected"), [
    ("/", "/", "/m"), ("/", "/a/b", "/m/a/b"), ("/a", "/a/b", "/m/b"), ("/a", "/a", "/m"),
    ("/a", "/ab", None), ("/a/b", "/a", None)])
def test_our_directory_is_below_the_mounts_root_or_unreachable(root: str, own: str,
                                                               expected: str | None) -> None:
    assert Hierarchy(1, frozenset({"memory"}), "/m", root, own).own_dir == expected


def test_no_usable_cgroup_says_why(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no cgroup filesystem is mounted"):
        cgroup.choose([])
    hidden = Hierarchy(1, frozenset({"memory"}), "/m", "/other", "/docker/ab")
    with pytest.raises(CgroupError, match="our memory cgroup /docker/ab is not under its mount"):
        cgroup.choose([hidden])
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("hugetlb\n")
    with pytest.raises(CgroupError, match=r"offers none of memory, pids \(only hugetlb\)"):
        cgroup.choose([Hierarchy(2, frozenset(), str(v2), "/", "/")])


def test_a_mount_over_a_hierarchy_hides_it(tmp_path: Path) -> None:
    ms = mountinfo(tmp_path, "/docker/ab /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
                   "/ /sys/fs/cgroup/memory rw - tmpfs tmpfs rw")
    assert cgroup.discover(DOCKER_V1, ms) == []


# -- creating it -----------------------------------------------------------------------------

def tree(base: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_v1_setup_limits_below_the_containers_own(tmp_path: Path) -> None:
    tree(tmp_path, {
        "memory/memory.stat": f"cache 0\nhierarchical_memory_limit {512 << 20}\n",
        "memory/agent/memory.limit_in_bytes": "", "memory/agent/cgroup.procs": "",
        "pids/pids.max": "400\n", "pids/agent/pids.max": "", "pids/agent/cgroup.procs": "",
        "cpu/agent/cpu.shares": "", "cpu/agent/cgroup.procs": ""})
    chosen = {c: Hierarchy(1, frozenset({c}), str(tmp_path / c), "/x", "/x")
              for c in ("memory", "pids", "cpu")}
    cg = cgroup.setup(1, chosen, limits(agent_pids="4096"), machine_memory=4 * GIB)
    assert (tmp_path / "memory/agent/memory.limit_in_bytes").read_text() == str(384 << 20)
    assert (tmp_path / "pids/agent/pids.max").read_text() == "300"
    assert (tmp_path / "cpu/agent/cpu.shares").read_text() == "204"
    assert cg.memory_max == 384 << 20 and cg.pids_max == 300 and cg.cpu_weight == 20
    assert cg.memcg == "/x/agent" and cg.leaf is None
    assert cg.procs_files == tuple(str(tmp_path / c / "agent/cgroup.procs")
                                   for c in ("cpu", "memory", "pids"))
    assert cg.describe().startswith(f"cgroup v1 (memory {tmp_path}/memory/agent, pids ")


def test_v1_unlimited_container_uses_the_machines_memory(tmp_path: Path) -> None:
    tree(tmp_path, {"memory/memory.stat": "hierarchical_memory_limit 9223372036854771712\n",
                    "memory/agent/memory.limit_in_bytes": ""})
    chosen = {"memory": Hierarchy(1, frozenset({"memory"}), str(tmp_path / "memory"), "/", "/")}
    cg = cgroup.setup(1, chosen, limits(), machine_memory=4 * GIB)
    assert cg.memory_max == 3 * GIB and cg.pids_max is None and cg.cpu_weight is None


def test_read_only_or_unwritable_cgroups_fall_back_with_the_reason(tmp_path: Path) -> None:
    ro = {"memory": Hierarchy(1, frozenset({"memory"}), str(tmp_path), "/", "/", readonly=True)}
    with pytest.raises(CgroupError, match="mounted read-only"):
        cgroup.setup(1, ro, limits(), machine_memory=GIB)
    (tmp_path / "memory.stat").write_text("")
    missing = {"memory": Hierarchy(1, frozenset({"memory"}), str(tmp_path), "/", "/")}
    with pytest.raises(CgroupError, match=r"cannot set memory\.limit_in_bytes of .*/agent"):
        cgroup.setup(1, missing, limits(), machine_memory=GIB)  # no such file: no controller


class V2Kernel:
    """cgroup v2's rules on a plain tree: a write to cgroup.procs moves the process; a
    cgroup with processes cannot enable controllers for children, unless it is the
    hierarchy's root (which has no cgroup.type)."""

    def __init__(self, own: Path) -> None:
        self.own = own
        self.writes: list[tuple[str, str]] = []

    def __call__(self, path: str, value: str) -> None:
        p = Path(path)
        self.writes.append((p.relative_to(self.own).as_posix(), value))
        if p.name == "cgroup.procs":
            for procs in self.own.rglob("cgroup.procs"):
                procs.write_text("".join(f"{x}\n" for x in procs.read_text().split()
                                         if x != value))
            p.write_text(p.read_text() + f"{value}\n")
        elif p.name == "cgroup.subtree_control" and (p.parent / "cgroup.type").exists() \
                and (p.parent / "cgroup.procs").read_text():
            raise OSError(errno.EBUSY, "Device or resource busy")
        else:
            p.write_text(value)


V2_OWN = {"cgroup.controllers": "cpuset cpu io memory pids\n", "cgroup.procs": "1\n7\n12\n",
          "cgroup.subtree_control": "", "memory.max": f"{GIB}\n", "pids.max": "max\n",
          "agent/memory.max": "", "agent/pids.max": "", "agent/cpu.weight": "",
          "agent/cgroup.procs": "", "daemon/cgroup.procs": ""}


def test_v2_moves_our_processes_to_a_leaf_then_limits_the_agent(tmp_path: Path) -> None:
    tree(tmp_path, {**V2_OWN, "cgroup.type": "domain\n"})
    h = Hierarchy(2, frozenset(), str(tmp_path), "/", "/")
    version, chosen = cgroup.choose([h])
    assert version == 2 and list(chosen) == ["memory", "pids", "cpu"]
    kernel = V2Kernel(tmp_path)
    cg = cgroup.setup(version, chosen, limits(), machine_memory=4 * GIB, writer=kernel)
    assert (tmp_path / "daemon/cgroup.procs").read_text().split() == ["1", "7", "12"]
    assert (tmp_path / "cgroup.procs").read_text() == ""
    assert kernel.writes[-4:] == [("cgroup.subtree_control", "+memory +pids +cpu"),
                                  ("agent/memory.max", str(768 << 20)),  # 75 % of 1 GiB
                                  ("agent/pids.max", "4096"), ("agent/cpu.weight", "20")]
    assert cg.leaf == f"{tmp_path}/daemon" and cg.procs_files == (f"{tmp_path}/agent/cgroup.procs",)
    assert cg.describe() == f"cgroup v2 ({tmp_path}/agent)" and cg.memcg == "/agent"


def test_v2_at_the_hierarchys_root_moves_nothing(tmp_path: Path) -> None:
    tree(tmp_path, V2_OWN)  # no cgroup.type: the root, exempt from the rule; not ours to move
    kernel = V2Kernel(tmp_path)
    h = Hierarchy(2, frozenset(), str(tmp_path), "/", "/")
    cg = cgroup.setup(2, cgroup.choose([h])[1], limits(), machine_memory=GIB, writer=kernel)
    assert not any(path.endswith("cgroup.procs") for path, _ in kernel.writes)
    assert (tmp_path / "cgroup.procs").read_text().split() == ["1", "7", "12"]
    assert cg.leaf is None and cg.dirs["memory"] == f"{tmp_path}/agent"


def test_v2_that_cannot_be_emptied_is_no_cgroup_mode(tmp_path: Path) -> None:
    tree(tmp_path, {**V2_OWN, "cgroup.type": "domain\n"})

    def stuck(path: str, value: str) -> None:  # a process that cannot be moved
        raise OSError(errno.EINVAL, "Invalid argument")

    h = Hierarchy(2, frozenset(), str(tmp_path), "/", "/")
    with pytest.raises(CgroupError, match=r"cannot move process 1 into .*/daemon: Invalid"):
        cgroup.setup(2, cgroup.choose([h])[1], limits(), machine_memory=GIB, writer=stuck)


def test_status_figures_from_the_agents_files(tmp_path: Path) -> None:
    tree(tmp_path, {"memory.usage_in_bytes": "1234\n", "pids.current": "17\n",
                    "pids.events": "max 3\n", "memory.oom_control":
                    "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"})
    cg = AgentCgroup(1, {"memory": str(tmp_path), "pids": str(tmp_path)})
    assert cg.figure("memory", "memory.current") == 1234
    assert cg.figure("pids", "pids.current") == 17
    assert cg.figure("pids", "pids.events", "max") == 3
    assert cg.figure("memory", "memory.oom", "oom_kill") == 2
    assert cg.figure("cpu", "cpu") is None
    assert cgroup.remove(cg) == [f"{tmp_path}: Directory not empty"]


# -- OOM kills -------------------------------------------------------------------------------

KMSG = ("6,2501,2197755529,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,"
        "mems_allowed=0,oom_memcg=/process_api/x/ct-test/agent,task_memcg=/process_api/x/"
        "ct-test/agent,task=python3,pid=6075,uid=1000\n")


def test_the_kernel_logs_victim_is_taken_only_when_it_is_the_agents() -> None:
    assert oom_kill_victim(KMSG, 1000, "/process_api/x/ct-test/agent") == "python3"
    assert oom_kill_victim(KMSG, 1000, "/ct-test/agent") == "python3"  # a cgroup namespace
    assert oom_kill_victim(KMSG, 1000, None) == "python3"
    assert oom_kill_victim(KMSG, 999, None) is None
    assert oom_kill_victim(KMSG, 1000, "/other/agent") is None
    assert oom_kill_victim("6,1,2,-;Killed process 6075 (python3)", 1000, None) is None
    odd = KMSG.replace("task=python3", "task=a,b c")
    assert oom_kill_victim(odd, 1000, None) == "a,b c"


class FakeLog:
    why = None

    def __init__(self, records: list[str]) -> None:
        self.pending = records

    def records(self) -> list[str]:
        out, self.pending = self.pending, []
        return out


def test_oom_watch_counts_from_its_baseline_and_names_the_victim() -> None:
    counter = iter([5, 5, 7, 7])
    watch = OomWatch(lambda: next(counter), "agent", "memory.oom_control", 1000,
                     "/process_api/x/ct-test/agent", FakeLog([KMSG]))  # type: ignore[arg-type]
    assert watch.poll() == 0 and watch.count == 0  # kills before boot are not ours
    assert watch.poll() == 2 and watch.count == 2 and watch.command == "python3"
    assert watch.last is not None
    assert watch.poll() == 0
    assert watch.status()["kernel_log"] is None
    blind = OomWatch(lambda: 1, "machine", "/proc/vmstat", 1000, None, None)
    assert blind.status()["kernel_log"] == "no kernel log"


def test_vmstat_counter(tmp_path: Path) -> None:
    f = tmp_path / "vmstat"
    f.write_text("pgfault 12\noom_kill 3\nnr_free_pages 9\n")
    assert vmstat_oom_kills(str(f)) == 3
    assert vmstat_oom_kills(str(tmp_path / "none")) is None


def test_cap_sys_resource_is_read_from_capeff(tmp_path: Path) -> None:
    f = tmp_path / "status"
    f.write_text("CapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n")
    assert not has_cap_sys_resource(str(f))
    f.write_text("CapEff:\t000001ffffffffff\n")
    assert has_cap_sys_resource(str(f))


def test_render_limits_says_mode_figures_and_oom_kills() -> None:
    lim = {"mode": "cgroup v1", "no_cgroup": None,
           "process": {"nproc": 400, "nice": 10, "oom_score_adj": 1000},
           "cgroup": {"version": 1, "dirs": {"memory": "/m/agent"},
                      "memory": {"max": 384 << 20, "current": 12 << 20},
                      "pids": {"max": 200, "current": 9, "refused": 3}, "cpu_weight": 20},
           "oom_score_adj": {"init": -1000, "daemon": -999, "dns": -900, "agent": 1000},
           "oom_note": None,
           "oom_kills": {"count": 2, "last": 0, "command": None, "scope": "agent",
                         "kernel_log": "no kernel log (/dev/kmsg: No such file or directory)"}}
    text = "\n".join(render_limits(lim))
    assert "cgroup v1 (memory /m/agent)" in text
    assert "agent cgroup: memory 12 MiB of 384 MiB, tasks 9 of 200 (forks refused: 3), " \
           "cpu weight 20 (the daemon's 100)" in text
    assert "oom_score_adj: init -1000, daemon -999, dns -900, agent 1000" in text
    assert "OOM kills (the agent's): 2, last at " in text
    assert "(command unknown: no kernel log (/dev/kmsg: No such file or directory))" in text
