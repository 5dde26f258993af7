"""The import graph of gopher_jax, read statically from the source, has no cycle.

Every `import` and `from ... import` counts, wherever it stands (module level, inside a
function, under `if TYPE_CHECKING`): a lazy import still ties the two modules together for a
reader. `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`
(the package's `__init__` that Python runs on the way to a submodule is not an edge: a
package's `__init__` may re-export its modules' API, as data/__init__.py does, so long as
those modules take nothing from it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "gopher_jax"
ROOT = Path(__file__).resolve().parent.parent / PKG


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    """The absolute name of a relative import `from .{level}name` inside `mod`."""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the gopher_jax modules it imports (by any import statement in its file)."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def target(name: str) -> str | None:
        # the longest prefix of `name` that is one of our modules
        parts = name.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in mods:
                return cand
            parts.pop()
        return None

    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve(mod, is_pkg, node.level, node.module) if node.level
                        else node.module or "")
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                names = subs + ([base] if len(subs) < len(node.names) else [])
            for n in names:
                t = target(n)
                if t is not None and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    return sorted(out)


def _cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """The shortest closed path from the component's first module back to it: a -> b -> a."""
    members = set(comp)
    start = comp[0]
    paths = {w: [start, w] for w in sorted(graph[start] & members)}
    frontier = list(paths)
    while start not in paths:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths[start]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph[f"{PKG}.cli.app"], "the graph did not find the package"
    found = cycles(graph)
    lines = [f"{len(c)} modules ({', '.join(c)}): " + " -> ".join(_cycle_path(graph, c))
             for c in found]
    assert not found, "import cycles in gopher_jax:\n" + "\n".join(lines)


def test_graph_sees_lazy_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "a.py").write_text("def f():\n    from gopher_jax.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\n")
    (pkg / "d.py").write_text("import gopher_jax.sub.c\nfrom gopher_jax.sub import VALUE, b\n")
    graph = import_graph(pkg)
    assert graph[f"{PKG}.a"] == {f"{PKG}.sub.b"}
    assert graph[f"{PKG}.sub.b"] == {f"{PKG}.sub.c"}
    assert graph[f"{PKG}.sub.c"] == {f"{PKG}.a"}
    assert graph[f"{PKG}.d"] == {f"{PKG}.sub", f"{PKG}.sub.b", f"{PKG}.sub.c"}
    assert cycles(graph) == [[f"{PKG}.a", f"{PKG}.sub.b", f"{PKG}.sub.c"]]


# data/'s layers, top first (data/__init__.py describes them): a module may import only those
# in later layers. A module not listed here is left to test_no_import_cycles.
DATA_LAYERS = (
    ("",),  # the API, data/__init__.py
    ("mixture",),
    ("pipeline",),
    ("engine",),
    ("corpus_filter",),
    ("shards",),
    ("artefacts",),
    ("sources",),
    ("builders", "dedup_sharded", "tokenized"),
    ("readers", "tokenizer", "rows", "digests", "records", "filters", "dedup"),
)


def test_data_modules_import_only_the_layers_under_them():
    graph = import_graph()
    layer = {f"{PKG}.data{'.' + m if m else ''}": i
             for i, names in enumerate(DATA_LAYERS) for m in names}
    upward = [f"{m} -> {d}" for m, i in layer.items() if m in graph
              for d in sorted(graph[m]) if layer.get(d, len(DATA_LAYERS)) <= i]
    assert not upward, "data/ imports against its layers:\n" + "\n".join(upward)
