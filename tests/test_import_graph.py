"""No import cycles among the project's modules (model, data_pipeline, pretrain), and no training
module imports the tools built on top of it (pretrain/inference, pretrain/bench, pretrain/study.py).

Every import counts, also one deferred into a function: a cycle that only deferral keeps from
failing is still two modules that each need the other."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("model", "data_pipeline", "pretrain")
# the tools around a trained model, the benchmarks and the study: training code imports none of them
TOOLS = ("pretrain.inference", "pretrain.bench", "pretrain.study")


def project_modules() -> dict[str, pathlib.Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts): path
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py")) if path.name != "__init__.py"}


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The project modules ``path`` imports (``from model import masks`` names model.masks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & set(modules)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                cycle = visit(imported)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_walk_sees_imports_and_finds_a_cycle():
    modules = project_modules()
    assert "pretrain.engine" in imports_of(modules["pretrain.checkpointing.sharding"], modules)
    assert "model.masks" in imports_of(modules["model.objectives"], modules)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def in_tools(module: str) -> bool:
    return any(module == tool or module.startswith(tool + ".") for tool in TOOLS)


def test_training_imports_no_tools():
    """pretrain/inference, pretrain/bench and the study sit on top of training, never under it."""
    modules = project_modules()
    assert {"pretrain.inference.convert", "pretrain.bench.cli"} <= set(modules)  # the walk sees the sub-packages
    assert in_tools("pretrain.inference.sample") and not in_tools("pretrain.inference_x")
    wrong = {name: sorted(filter(in_tools, imports_of(path, modules)))
             for name, path in modules.items() if not in_tools(name)}
    wrong = {name: tools for name, tools in wrong.items() if tools}
    assert not wrong, f"training modules importing the tools: {wrong}"
