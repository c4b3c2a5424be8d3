"""Imports in jaxllm/ flow one way: a test that reads every module's imports (function-local ones too, which can
only hide a circle, not remove it) and fails on a circle between files, or on an import from a layer up to a higher
one in ARCHITECTURE.md's layer list."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "jaxllm"
ARCHITECTURE = (Path(__file__).parents[1] / "ARCHITECTURE.md").read_text()

# Circles not yet taken apart, each with what removes it. A new circle fails; so does a listed one that is gone.
KNOWN: dict[frozenset[str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """jaxllm module -> the jaxllm modules it imports (a `from pkg import name` counts name when it is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports():
    graph = import_graph()
    assert "jaxllm.config" in graph["jaxllm.language_model"]
    assert "jaxllm.losses" in graph["jaxllm.language_model"]  # `from jaxllm.losses import ...`
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_circles_between_modules():
    found = set(circles(import_graph()))
    assert found <= set(KNOWN), "new import circle(s): " + "; ".join(" <-> ".join(sorted(c)) for c in found - set(KNOWN))
    assert found == set(KNOWN), "circle(s) gone, remove from KNOWN: " + "; ".join(sorted(map(str, set(KNOWN) - found)))


def _block(name: str) -> list[str]:
    return re.search(rf"```{name}\n(.*?)```", ARCHITECTURE, re.S).group(1).strip().splitlines()


def layer_of(module: str, layers: list[list[str]]) -> int:
    """Index of the layer holding `module`: the layer naming it or its longest listed package prefix."""
    best = max(((len(p), i) for i, prefixes in enumerate(layers) for p in prefixes
                if module == p or (p != "jaxllm" and module.startswith(p + "."))), default=None)
    assert best is not None, f"{module} is in no layer of ARCHITECTURE.md"
    return best[1]


def test_imports_never_go_up_a_layer():
    layers = [line.split(":", 1)[1].split() for line in _block("layers")]
    allowed = {tuple(line.split(" -> ")) for line in _block("exceptions")}
    graph = import_graph()
    upward = {(m, d) for m, deps in graph.items() for d in deps if layer_of(d, layers) > layer_of(m, layers)}
    assert upward <= allowed, "imports up a layer: " + "; ".join(f"{m} -> {d}" for m, d in sorted(upward - allowed))
    assert upward == allowed, "no longer needed, remove from ARCHITECTURE.md: " + str(sorted(allowed - upward))
    assert layer_of("jaxllm.models.moe", layers) < layer_of("jaxllm.language_model", layers) < layer_of("jaxllm.cli", layers)
