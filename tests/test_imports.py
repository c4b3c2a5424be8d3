"""Imports in jaxllm/ flow one way: a test that reads every module's imports (function-local ones too, which can
only hide a circle, not remove it) and fails on a circle between files."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "jaxllm"

# Circles not yet taken apart, each with what removes it. A new circle fails; so does a listed one that is gone.
KNOWN = {
    frozenset({"jaxllm.interop.models", "jaxllm.train.setup"}):
        "loading a run directory builds a StepSetup, and fine-tuning loads its base through interop: "
        "issue 'One shape for every training method' hands the base params in",
}


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
