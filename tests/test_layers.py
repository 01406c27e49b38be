"""The package's imports go one way: each module imports only its own layer or the layers below it, and
no chain of imports leads back to where it started.

A layer can then be read, tested and changed without the ones above it: tuning needs only the
selection's data format (``entries``), a selector selects and then attaches through tuning, and the
workflows put everything together. Every import counts, at module level or inside a function, since an
import inside a function is still a dependency; it only runs later. Names a package loads on first use
(its ``_EXPORTS`` map) count as imports of those modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "medseg_peft"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# The first entry that a module's dotted name equals, or starts with followed by a dot, gives its layer.
LAYERS: dict[str, int] = {
    "medseg_peft.io": 0,
    "medseg_peft.distributed": 0,
    "medseg_peft.lazy": 0,
    "medseg_peft.models": 1,
    "medseg_peft.data": 1,
    "medseg_peft.entries": 2,
    "medseg_peft.tuning": 3,
    "medseg_peft.selection": 4,
    "medseg_peft.workflows": 5,
    "medseg_peft.export": 5,
    "medseg_peft.compare": 5,
    "medseg_peft.comparison": 5,
    "medseg_peft.recipes": 5,
    "medseg_peft.results": 5,
    "medseg_peft.__main__": 5,
    "medseg_peft": 5,  # the package's own __init__: the public API over every layer
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by its ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> int | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def _package_of(module: str) -> str:
    """The package a module's relative imports start from: itself for a package, else its parent."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _lazy_exports(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, module)`` of a package's ``_EXPORTS = {name: submodule or full dotted module name}`` map."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                out += [(v.lineno, v.value) for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return out


def imports_of(module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of the package's own modules that ``module`` makes."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module).split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((node.lineno, source))
            # ``from package import name`` imports the submodule ``name`` when there is one
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names if f"{source}.{alias.name}" in MODULES]
    if MODULES[module].name == "__init__.py":
        found += [(line, name if name.startswith(PACKAGE + ".") else f"{module}.{name}") for line, name in _lazy_exports(tree)]
    out = []
    for line, name in found:
        # ``import medseg_peft.a.b`` names a module; anything deeper names an attribute of the longest module it starts with
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module and name.split(".")[0] == PACKAGE:
            out.append((line, name))
    return out


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"modules with no layer in LAYERS: {missing}"


def test_imports_go_down_the_layers():
    upward = []
    for module, imports in GRAPH.items():
        own = layer_of(module)
        for line, target in imports:
            if layer_of(target) is not None and own is not None and layer_of(target) > own:
                path = MODULES[module].relative_to(ROOT.parent)
                upward.append(f"{path}:{line}: {module} (layer {own}) imports {target} (layer {layer_of(target)})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it has none (depth-first, iterative)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per group of modules that import each other (each strongly connected component of
    ``graph`` with a cycle), so a failure names every tangle at once."""
    reach = {}
    for node in graph:  # the graph is small: plain reachability is clear enough
        seen, todo = set(), list(graph[node])
        while todo:
            nxt = todo.pop()
            if nxt not in seen:
                seen.add(nxt)
                todo += graph.get(nxt, [])
        reach[node] = seen
    out, done = [], set()
    for node in sorted(graph):
        if node in done or node not in reach[node]:
            continue
        group = {m for m in reach[node] if node in reach.get(m, ())} | {node}
        done |= group
        out.append(find_cycle({m: [t for t in graph[m] if t in group] for m in sorted(group)}))
    return out


def test_no_import_cycles():
    graph = {module: sorted({target for _, target in imports}) for module, imports in GRAPH.items()}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_checks_see_what_they_check():
    """The parser finds relative, function-level and lazy imports, and the cycle search finds a cycle."""
    assert ("medseg_peft.models.sam" in {t for _, t in GRAPH["medseg_peft.models.segmenter"]})
    assert any(t.startswith("medseg_peft.") for _, t in GRAPH["medseg_peft.workflows"])
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None
    assert cycles({"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c", "a"], "e": ["e"], "f": []}) == [["a", "b", "a"], ["c", "d", "c"], ["e", "e"]]
