"""Imports run one way (cli/sweep -> pipeline -> stages -> the stage contract): no module of slam_ray imports,
directly or through others, a module that imports it back. Imports inside functions count: they run too."""

from __future__ import annotations

import ast
from pathlib import Path

import slam_ray
from slam_ray.config import STAGES
from slam_ray.pipeline import STAGE_FUNCTIONS, stage_function

PACKAGE = Path(slam_ray.__file__).parent


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the slam_ray modules it imports anywhere in its file (`from slam_ray import x` counts x when
    x is a module)."""
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and t != "slam_ray"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that returns to its start, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_slam_ray():
    graph = import_graph(PACKAGE)
    assert "slam_ray.pipeline" in graph and graph["slam_ray.cli"]  # the graph was read from the real files
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stages_do_not_import_the_pipeline():
    graph = import_graph(PACKAGE)
    for target in STAGE_FUNCTIONS.values():
        module = target.split(":")[0]
        assert "slam_ray.pipeline" not in graph[module] and "slam_ray.cli" not in graph[module], module


def test_the_registry_holds_every_stage_the_schema_names():
    assert set(STAGE_FUNCTIONS) == set(STAGES)
    for stage in STAGES:
        assert callable(stage_function(stage))
