"""The import graph of sparkgpt/: imports point down the layers of docs/architecture.md and never form a cycle.

Every import counts, module-level and inside functions (a deferred import that dodges a cycle is still a wall in
the wrong place); `cli.py` and `__main__.py`, the skin over everything, are left out."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sparkgpt"

# Lowest first; a module is in the layer of its longest matching prefix. docs/architecture.md explains each.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("sparkgpt.errors", "sparkgpt.files", "sparkgpt.config", "sparkgpt.hardware")),
    ("text", ("sparkgpt.tokenizer", "sparkgpt.data")),
    ("model", ("sparkgpt.model",)),
    ("checkpoint", ("sparkgpt.checkpoint",)),
    ("pipelines", ("sparkgpt.generate", "sparkgpt.train", "sparkgpt.data.prepare")),
    ("lm", ("sparkgpt.lm",)),
    ("applications", ("sparkgpt.chat", "sparkgpt.serve", "sparkgpt.tasks", "sparkgpt.evaluate", "sparkgpt.rag")),
]
SKIN = ("sparkgpt", "sparkgpt.cli", "sparkgpt.__main__")
# A package's __init__ that re-exports a higher layer's names (sparkgpt.data.prepare) sits in that layer.
FACADES = {"sparkgpt.data": "pipelines"}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for file in root.rglob("*.py"):
        parts = file.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file. `from a import b` counts a.b when that is a
    module, else a (whose __init__ defines b)."""
    modules = module_names(root)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, file in modules.items():
        if module in SKIN:
            continue
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        resolved = {resolve(t) for t in targets if t.split(".")[0] == "sparkgpt"}
        graph[module] = {t for t in resolved if t is not None and t != module}
    return graph


def layer_of(module: str) -> int:
    if module in FACADES:
        return [name for name, _ in LAYERS].index(FACADES[module])
    best, layer = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    return layer


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer():
    assert [m for m in module_names() if m not in SKIN and layer_of(m) < 0] == []


def test_no_import_climbs_the_layers():
    climbing = sorted(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                      for module, targets in import_graph().items() for target in targets
                      if target in SKIN or layer_of(target) > layer_of(module))
    assert climbing == []


def test_serving_a_model_loads_no_training_code():
    """At run time too: importing a module runs its packages' __init__ files, which must not pull training in."""
    code = ("import sys, sparkgpt.serve.server, sparkgpt.lm; "
            "print(sorted(m for m in sys.modules if m.startswith('sparkgpt.train')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    assert result.stdout.strip() == "[]"


def test_generation_and_training_do_not_import_each_other():
    graph = import_graph()
    training = [m for m in graph if m.startswith("sparkgpt.train")]
    assert [m for m in training if "sparkgpt.generate" in graph[m]] == []
    assert [t for t in graph["sparkgpt.generate"] if t.startswith("sparkgpt.train")] == []


def test_retrieval_imports_none_of_the_applications_built_on_it():
    graph = import_graph()
    users = ("sparkgpt.tasks", "sparkgpt.evaluate", "sparkgpt.serve", "sparkgpt.chat")
    assert sorted(f"{m} -> {t}" for m in graph if m.startswith("sparkgpt.rag") for t in graph[m]
                  if t.startswith(users)) == []


@pytest.mark.parametrize("source, expected", [
    ("from sparkgpt.b import thing\n", {"sparkgpt.b"}),
    ("def f():\n    from sparkgpt import c\n", {"sparkgpt.c"}),
    ("from . import b\n", {"sparkgpt.b"}),
    ("import sparkgpt.b as b\n", {"sparkgpt.b"}),
    ("from sparkgpt import name_in_init\n", {"sparkgpt"}),
])
def test_the_graph_counts_every_kind_of_import(tmp_path, source, expected):
    package = tmp_path / "sparkgpt"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(source)
    (package / "b.py").write_text("thing = 1\n")
    (package / "c.py").write_text("from sparkgpt.a import f\n")
    assert import_graph(package)["sparkgpt.a"] == expected


def test_a_cycle_and_a_climbing_import_are_found(tmp_path):
    package = tmp_path / "sparkgpt"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "__init__.py").write_text("")
    (package / "model" / "a.py").write_text("def f():\n    from sparkgpt.lm import LM\n")
    (package / "lm.py").write_text("from sparkgpt.model.a import f\n")
    graph = import_graph(package)
    assert cycles(graph) == [["sparkgpt.lm", "sparkgpt.model.a"]]
    assert layer_of("sparkgpt.lm") > layer_of("sparkgpt.model.a")
