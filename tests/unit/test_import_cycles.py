"""No import circles in ``daemon/codetainer`` (issue 10: "no circles in ``network/``"):
the modules' imports, read as ``tests/unit/test_layers.py`` reads them (top level, inside
functions, under ``TYPE_CHECKING``), form no cycle. Same-layer imports are allowed by the
layer test; this one keeps them one-way too. A cycle is printed module by module."""

from __future__ import annotations

from collections.abc import Mapping, Set
from pathlib import Path

from tests.unit.test_layers import imports, modules

#: cycles known today, (their modules) -> why; printed on every run. Remove an entry when
#: its cycle is gone (the test fails on a stale one); never add one to make a new cycle
#: pass: move what both sides need into a module below them instead.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def strongly_connected(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """The graph's strongly connected parts of more than one module (Tarjan, iterative),
    each sorted: every cycle lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                part: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.append(member)
                    if member == node:
                        break
                if len(part) > 1:
                    parts.append(sorted(part))
    return parts


def a_cycle(graph: Mapping[str, Set[str]], part: list[str]) -> list[str]:
    """One cycle through ``part``'s first module, as ``[a, b, ..., a]`` (shortest)."""
    start, inside = part[0], set(part)
    paths: dict[str, list[str]] = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"{part} is not strongly connected")


def describe(graph: Mapping[str, Set[str]], part: list[str]) -> str:
    edges = "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(part)))}" for m in part)
    return f"{' -> '.join(a_cycle(graph, part))}  ({edges})"


def test_no_import_cycles() -> None:
    graph = import_graph()
    found, seen_known = [], set()
    for part in strongly_connected(graph):
        if frozenset(part) in KNOWN_CYCLES:
            seen_known.add(frozenset(part))
            continue
        found.append(describe(graph, part))
    for cycle, why in sorted(KNOWN_CYCLES.items(), key=lambda kv: sorted(kv[0])):
        print(f"known import cycle: {', '.join(sorted(cycle))}: {why}")
    assert not found, ("import cycles (move what both sides need into a module below them; "
                       "a typing.Protocol for what one side reads of the other):\n  "
                       + "\n  ".join(found))
    stale = set(KNOWN_CYCLES) - seen_known
    assert not stale, f"KNOWN_CYCLES entries that are no cycle now (remove them): {stale}"


def test_network_has_no_cycles_but_the_known_one() -> None:
    """The issue's own ask, spelled out: ops and why read the controller through
    ``network.active``, never by importing it."""
    graph = import_graph()
    for reader in ("network.ops", "network.why", "network.active"):
        assert "network.controller" not in graph[reader], f"{reader} imports the controller"
    parts = [p for p in strongly_connected(graph) if any(m.startswith("network.") for m in p)]
    assert all(frozenset(p) in KNOWN_CYCLES for p in parts), [describe(graph, p) for p in parts]


def test_a_cycle_is_found_and_printed(tmp_path: Path) -> None:
    """Through the real import reader: a TYPE_CHECKING import back closes a cycle."""
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("from codetainer.network import b\n")
    b.write_text("def f():\n    from codetainer.network.c import X\n")
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from codetainer.network.a import Y\n")
    known = {"network.a", "network.b", "network.c", "network.d"}
    graph = {f"network.{p.stem}": imports(f"network.{p.stem}", p, known) for p in (a, b, c)}
    graph["network.d"] = {"network.a"}
    parts = strongly_connected(graph)
    assert parts == [["network.a", "network.b", "network.c"]]
    assert describe(graph, parts[0]).startswith(
        "network.a -> network.b -> network.c -> network.a")
    assert strongly_connected({"x": {"y"}, "y": set()}) == []
