"""Imports run one way, and the package layout names the layers (docs/layout.md):

    cli -> sweeps -> pipeline -> stages -> parallel -> {speech, lm, evals} -> core -> config -> errors

A module imports only its own layer or layers below it (speech, lm and evals are one layer); no stage imports
another (generation is eval's step: eval imports it); nothing imports, directly or through others, a module that
imports it back; and speech, lm, evals (and config) never reach Ray. Imports inside functions count: they run too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


def ray_importers(root: Path) -> dict[str, int]:
    """module -> the line of its first `import ray...` / `from ray... import`, anywhere in its file."""
    found: dict[str, int] = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found[name] = min(found.get(name, node.lineno), node.lineno)
    return found


# Layer of each top-level folder or module of slam_ray, from the bottom; a module may import its own layer and
# those below. `slam_ray` itself (__init__) is a leaf.
LAYERS = {"slam_ray": 0, "errors": 0, "config": 1, "core": 2, "speech": 3, "lm": 3, "evals": 3, "parallel": 4,
          "stages": 5, "pipeline": 6, "sweeps": 7, "cli": 8}
# A stage's own steps, which only that stage may import: {step module: the stage module}.
STAGE_STEPS = {"slam_ray.stages.generation": "slam_ray.stages.eval"}
# Imports that break the direction and could not (yet) move to the right layer: (importer, imported) -> why.
# Empty: add an entry only with the reason, and move the function instead where you can.
ALLOWED: dict[tuple[str, str], str] = {}
RAY_FREE = ("config", "errors", "speech", "lm", "evals")  # no Ray, directly or through what they import


def layer_of(module: str) -> str:
    """The layer a module belongs to: its folder under slam_ray (slam_ray.core.lock -> core), or its own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the direction, as `importer (layer) -> imported (layer)`."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if (module, target) in ALLOWED:
                continue
            mine, theirs = layer_of(module), layer_of(target)
            if mine not in LAYERS or theirs not in LAYERS:
                unknown = mine if mine not in LAYERS else theirs
                bad.append(f"{module} -> {target}: `{unknown}` has no layer (add it to LAYERS in tests/test_imports.py)")
            elif LAYERS[theirs] > LAYERS[mine]:
                bad.append(f"{module} ({mine}) -> {target} ({theirs}): imports point down the layers")
            elif mine == theirs == "stages" and target != "slam_ray.stages" and STAGE_STEPS.get(target) != module:
                bad.append(f"{module} -> {target}: a stage imports another stage (only a stage's own step may be)")
    return bad


def reaches_ray(graph: dict[str, set[str]], ray_direct: dict[str, int], start: str) -> list[str] | None:
    """The chain of imports from `start` to a module that imports ray, or None."""
    seen = {start}
    todo = [[start]]
    while todo:
        chain = todo.pop(0)
        if chain[-1] in ray_direct:
            return chain
        for nxt in sorted(graph.get(chain[-1], ())):
            if nxt not in seen:
                seen.add(nxt)
                todo.append([*chain, nxt])
    return None


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


def test_the_layer_checker_finds_upward_imports_and_stage_to_stage_imports():
    graph = {"slam_ray.core.runner": {"slam_ray.stages.train"}, "slam_ray.stages.eval": {"slam_ray.stages.generation"},
             "slam_ray.stages.dpo": {"slam_ray.stages.train"}, "slam_ray.lm.scoring": {"slam_ray.speech.units"},
             "slam_ray.speech.audio": {"slam_ray.tools.x"}}
    bad = layer_violations(graph)
    assert len(bad) == 3, bad
    upward, unknown, stage_to_stage = bad  # sorted by importer: core, speech, stages
    assert upward.startswith("slam_ray.core.runner (core) -> slam_ray.stages.train (stages)")
    assert "`tools` has no layer" in unknown
    assert stage_to_stage.startswith("slam_ray.stages.dpo -> slam_ray.stages.train: a stage imports another stage")
    assert reaches_ray({"a": {"b"}, "b": {"c"}, "c": set()}, {"c": 3}, "a") == ["a", "b", "c"]
    assert reaches_ray({"a": {"b"}, "b": set()}, {"c": 3}, "a") is None


def test_every_import_points_down_the_layers():
    graph = import_graph(PACKAGE)
    assert {layer_of(m) for m in graph} == set(LAYERS)  # every folder has a layer, and each layer has modules
    bad = layer_violations(graph)
    assert not bad, "imports against the direction (move the function to the right layer):\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", RAY_FREE)
def test_the_layers_below_parallel_never_import_ray(layer):
    graph = import_graph(PACKAGE)
    direct = ray_importers(PACKAGE)
    assert "slam_ray.parallel.actors" in direct  # the checker sees imports inside functions
    modules = [m for m in graph if layer_of(m) == layer]
    assert modules
    for module in modules:
        chain = reaches_ray(graph, direct, module)
        assert chain is None, (f"{module} reaches Ray: {' -> '.join(chain)} (line {direct[chain[-1]]}); "
                               f"{layer} runs without Ray: move the Ray part to slam_ray/parallel/")


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
