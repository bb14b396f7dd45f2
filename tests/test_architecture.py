"""The package's import graph: no cycles between modules, and data flows one way between the layers.

Every module is read with ``ast`` (nothing is imported), lazy imports inside functions included. Imports under
``if TYPE_CHECKING:`` are kept for the layer rules but not for cycles: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mimo_voice"
FOLDERS = ("agent", "configs", "streaming", "tools", "transports")

# Layer -> the layers it may import (besides itself): configs <- streaming.model <- streaming.presets <-
# streaming.engine <- agent <- transports, with tools beside the engine and the benchmarks on top of their layer.
ALLOWED: dict[str, set[str]] = {
    "configs": set(),
    "streaming": set(),  # the namespace package itself
    "streaming.model": {"configs.errors"},  # the one exception: the error hierarchy
    "streaming.presets": {"configs", "streaming.model"},  # trains on the model's real prompt format
    "streaming.engine": {"configs", "streaming.model", "streaming.presets"},  # loads the embedded preset
    # Engines as Ray actors and the front-end's pool of them: the engine over another transport.
    "streaming.cluster": {"configs", "streaming.model", "streaming.engine", "streaming.presets"},
    "streaming.bench": {"configs", "streaming.model", "streaming.engine", "streaming.presets", "streaming.cluster"},
    "tools": {"configs", "streaming.model"},
    "agent": {"configs", "streaming.model", "streaming.engine", "tools"},
    "transports": {"configs", "streaming.model", "streaming.engine", "streaming.cluster", "tools", "agent"},
    "transports.bench": {
        "configs",
        "streaming.model",
        "streaming.presets",
        "streaming.engine",
        "streaming.bench",
        "streaming.cluster",
        "tools",
        "agent",
        "transports",
    },
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))}


def layer_of(module: str) -> str:
    """The longest ALLOWED key that prefixes the module (``mimo_voice.`` stripped)."""
    name = module.removeprefix(f"{PACKAGE}.")
    return max((key for key in ALLOWED if name == key or name.startswith(key + ".")), key=len)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported package module, whether it runs) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        # `from package import name` imports the submodule `name` when there is one.
        return [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]

    def visit(node: ast.AST, runs: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for statement in child.body:
                    visit_statement(statement, runs=False)
                for statement in child.orelse:
                    visit_statement(statement, runs=runs)
                continue
            visit_statement(child, runs)

    def visit_statement(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, runs) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend((name, runs) for name in resolve(node))
        visit(node, runs)

    visit(tree, True)
    return [(name, runs) for name, runs in found if name.startswith(f"{PACKAGE}.") and name in known]


def import_graph() -> dict[str, list[tuple[str, bool]]]:
    modules = package_modules()
    known = set(modules)
    return {module: imports_of(module, path, known) for module, path in modules.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return cycles


def test_the_walk_sees_relative_lazy_and_type_checking_imports():
    graph = import_graph()
    engine = dict(graph["mimo_voice.streaming.engine.engine"])
    assert engine["mimo_voice.streaming.engine.protocol"] is True  # relative
    assert engine["mimo_voice.streaming.presets.tiny_training"] is True  # inside Engine.load
    assert dict(graph["mimo_voice.transports.cli"])["mimo_voice.streaming.model.info"] is True  # `from x import info`
    assert dict(graph["mimo_voice.streaming.engine.conversation"])["mimo_voice.streaming.engine.worker"] is False


def test_no_import_cycles():
    graph = import_graph()
    edges = {module: {name for name, runs in imports if runs and name != module} for module, imports in graph.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle of meaning.
    for module in edges:
        edges[module] = {name for name in edges[module] if not module.startswith(name + ".")}
    assert find_cycles(edges) == []


def test_imports_follow_the_layers():
    wrong = []
    for module, imports in import_graph().items():
        layer = layer_of(module)
        for name, _ in imports:
            target = layer_of(name)
            allowed = ALLOWED[layer] | {layer}
            target_name = name.removeprefix(f"{PACKAGE}.")
            if not any(target == key or target_name == key or target_name.startswith(key + ".") for key in allowed):
                wrong.append(f"{module} -> {name}")
    assert wrong == []


def test_the_model_imports_nothing_of_the_app_but_the_errors():
    outside = {
        f"{module} -> {name}"
        for module, imports in import_graph().items()
        if layer_of(module) == "streaming.model"
        for name, _ in imports
        if not name.startswith(f"{PACKAGE}.streaming.model") and name != f"{PACKAGE}.configs.errors"
    }
    assert outside == set()


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
