"""Layers point one way (STYLE rule 12): no module of ``daemon/codetainer`` imports from a
layer above its own. The order is README's "Layers" table, read from there; every import
counts (top level, inside functions, under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "daemon" / "codetainer"

#: upward imports known today, (importer, imported) -> why; printed on every run. Remove
#: an entry when its import is gone (the test fails on a stale one); never add one to
#: make a new upward import pass: move the shared part down instead.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Layer:
    number: int
    name: str
    patterns: tuple[str, ...]


def readme_layers() -> list[Layer]:
    """The fenced table under README's ``### Layers`` heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Layers\n", 1)[1]
    block = section.split("```\n", 2)[1]
    layers: list[Layer] = []
    for line in block.splitlines()[1:]:  # the first line is the header
        row = re.match(r"(\d+)\s+(\w+)\s+(.*)", line)
        if row:
            layers.append(Layer(int(row[1]), row[2], ()))
            line = row[3]
        names = tuple(n.strip() for n in line.split(",") if n.strip())
        last = layers[-1]
        layers[-1] = Layer(last.number, last.name, last.patterns + names)
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts).removeprefix("codetainer.") if len(parts) > 1 else "codetainer"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports (``from codetainer.x import y`` names the
    module ``x.y`` when that is one, else ``x``), relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = ["codetainer", *name.split(".")] if name != "codetainer" else ["codetainer"]
                if path.name != "__init__.py":
                    here = here[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, *([base] if base else [])])
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        named = {t.removeprefix("codetainer.") if t != "codetainer" else t for t in targets
                 if t == "codetainer" or t.startswith("codetainer.")} & known
        if isinstance(node, ast.ImportFrom) and len(named) > 1:
            named.discard(targets[-1].removeprefix("codetainer."))  # it named submodules
        found |= named
    found.discard(name)
    return found


def layer_of(module: str, layers: list[Layer]) -> Layer | None:
    """The layer of the most specific pattern: the exact name, else the longest ``pkg.*``."""
    best: tuple[int, Layer] | None = None
    for layer in layers:
        for pattern in layer.patterns:
            if pattern == module:
                score = 10_000
            elif pattern.endswith(".*") and module.startswith(pattern[:-1]):
                score = len(pattern)
            else:
                continue
            if best is None or score > best[0]:
                best = (score, layer)
    return best[1] if best else None


def test_the_readme_names_the_layers_in_order() -> None:
    layers = readme_layers()
    assert [layer.number for layer in layers] == list(range(len(layers)))
    assert layers[0].name == "vocabulary" and layers[-1].name == "wiring"
    patterns = [p for layer in layers for p in layer.patterns]
    assert len(patterns) == len(set(patterns)), "a pattern is in two layers"


def test_every_module_has_a_layer() -> None:
    layers = readme_layers()
    missing = sorted(m for m in modules() if layer_of(m, layers) is None)
    assert not missing, f"place these in README's Layers table: {missing}"


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    layers = readme_layers()
    mods = modules()
    known = set(mods)
    upward: list[str] = []
    seen_known: set[tuple[str, str]] = set()
    for name, path in mods.items():
        mine = layer_of(name, layers)
        assert mine is not None
        for dep in sorted(imports(name, path, known)):
            theirs = layer_of(dep, layers)
            assert theirs is not None
            if theirs.number <= mine.number:
                continue
            if (name, dep) in KNOWN_UPWARD:
                seen_known.add((name, dep))
                continue
            upward.append(f"{name} ({mine.number} {mine.name}) imports {dep} "
                          f"({theirs.number} {theirs.name})")
    for (importer, imported), why in sorted(KNOWN_UPWARD.items()):
        print(f"known upward import: {importer} -> {imported}: {why}")
    assert not upward, ("imports from a layer above (move the shared part down, see README "
                        "Layers):\n  " + "\n  ".join(upward))
    stale = set(KNOWN_UPWARD) - seen_known
    assert not stale, f"KNOWN_UPWARD entries no longer imported (remove them): {sorted(stale)}"


@pytest.mark.parametrize(("source", "expected"), [
    ("from codetainer.boot.engine import Step\n", {"boot.engine"}),
    ("from codetainer.network import dnscheck\n", {"network.dnscheck"}),
    ("def f():\n    from codetainer.daemon import main\n", {"daemon"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from codetainer import log\n",
     {"log"}),
    ("from ..control.server import Request\n", {"control.server"}),
    ("import codetainer.settings\nimport os\n", {"settings"}),
])
def test_the_import_reader_sees_every_kind_of_import(
    tmp_path: Path, source: str, expected: set[str],
) -> None:
    known = {"boot.engine", "network", "network.dnscheck", "daemon", "log", "control.server",
             "settings", "network.ops"}
    path = tmp_path / "ops.py"
    path.write_text(source)
    assert imports("network.ops", path, known) == expected


def test_an_upward_import_is_caught() -> None:
    layers = readme_layers()
    engine, plan = layer_of("boot.engine", layers), layer_of("boot.plan", layers)
    assert engine is not None and plan is not None and engine.number < plan.number
    settings = layer_of("settings", layers)
    assert settings is not None and settings.number == 0
