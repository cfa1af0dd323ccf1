"""fra's modules import one way: no import cycles, module-level or inside functions.

Every ``import fra...`` / ``from fra... import ...`` statement anywhere in a module (function-level
imports included) is an edge; a package's ``__init__`` counts as a module of its own. A cycle
found here names its modules, so a circle added later fails with the path to break.
"""
from __future__ import annotations

import ast
from pathlib import Path

import fra

ROOT = Path(fra.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The fra module that ``name`` refers to (``fra.a.b`` or, for ``from fra.a import b``, its longest
    known prefix)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the fra modules it imports (``fra.x.y``), from the source of every module."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from fra.a import b`` imports fra.a.b when b is a module, else a name of fra.a.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t == "fra" or t.startswith("fra."):
                    dep = _resolve(t, modules)
                    if dep and dep != mod:
                        graph[mod].add(dep)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _ignoring_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges *into* a package's ``__init__`` from inside that package.

    ``fra.models.fra`` importing ``fra.models.backbones`` executes ``fra/models/__init__.py`` first,
    but a submodule importing a sibling through the package's re-exports is not the circle this
    test is about; it is about two modules that each need the other."""
    return {m: {d for d in deps if not (m.startswith(d + ".") and (ROOT.parent / Path(*d.split("."))).is_dir())}
            for m, deps in graph.items()}


def test_the_graph_is_read_from_every_kind_of_import():
    g = import_graph()
    assert "fra.train.checkpointing" in g["fra.train.plain"]  # module level, from-import of names
    assert "fra.train.worker" in g["fra.train.ray_trainer"]  # inside a function
    assert "fra.storage" in g["fra.pipeline"]  # ``from fra import storage as st``: a module


def test_find_cycles_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(g) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_fra_has_no_import_cycles():
    cycles = find_cycles(_ignoring_package_inits(import_graph()))
    assert not cycles, "import cycles among fra modules (make the dependency point one way):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)
