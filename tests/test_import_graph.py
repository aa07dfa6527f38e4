"""The import graph of longtune has no cycles, among modules or among folders (issue 28).

Every .py file under the code folders (pyproject's [tool.setuptools.package-dir], so a new folder is picked up
when it is added there) is parsed with `ast`; nothing is imported. Every import counts, the ones inside functions
too (a lazy import is still a dependency); only imports under `if TYPE_CHECKING:` do not. `python
tests/test_import_graph.py` prints the folder graph and the lines of code per folder (README: "Layout").
"""
from __future__ import annotations

import ast
import tomllib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = "longtune"
# Folders that import no other longtune folder, but for the modules named: the planner reads the table of model
# families, which is torch-free and itself imports nothing of longtune (checked below).
LEAVES = {"planner": ("longtune.models.families",), "kernels": ()}


def folders() -> dict[str, Path]:
    """{folder: its directory}, from pyproject's [tool.setuptools.package-dir] ("longtune.X" = "X")."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, directory in package_dir.items():
        top, _, folder = package.partition(".")
        if top == TOP and folder and "." not in folder and (ROOT / directory).is_dir():
            out[folder] = ROOT / directory
    return out


def _module_files() -> dict[str, Path]:
    """{"longtune.trainer.parallel": path} for every .py file of every code folder."""
    out = {}
    for folder, directory in folders().items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((TOP, folder) + parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node in the tree, at any depth (in functions too), in source order, except those
    under `if TYPE_CHECKING:` (its `else:` branch runs, and counts)."""
    for node in ast.iter_child_nodes(tree):
        for child in node.orelse if isinstance(node, ast.If) and _is_type_checking(node.test) else [node]:
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            yield from _imports(child)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longtune module `name` names, or its nearest enclosing one that exists; None outside longtune."""
    while name.startswith(TOP + "."):
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {t for a in node.names if (t := _known(a.name, modules))}
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        target = sub if sub in modules else _known(base, modules)  # `from . import checkpoint` is the submodule
        if target:
            out.add(target)
    return out


@lru_cache(maxsize=1)
def module_graph() -> dict[str, frozenset[str]]:
    """{module: the longtune modules it imports}, full dotted names ("longtune.trainer.parallel")."""
    modules = _module_files()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in _imports(tree):
            targets |= _targets(module, path, node, modules)
        targets.discard(module)
        graph[module] = frozenset(targets)
    return graph


def _folder(module: str) -> str:
    return module.split(".")[1]


def folder_graph() -> dict[str, list[str]]:
    """{folder: sorted list of the other longtune folders it imports}."""
    out: dict[str, set[str]] = {folder: set() for folder in folders()}
    for module, targets in module_graph().items():
        out[_folder(module)] |= {_folder(t) for t in targets} - {_folder(module)}
    return {folder: sorted(deps) for folder, deps in out.items()}


def _module_edges(source: str, target: str) -> list[str]:
    """The module imports behind the folder edge source -> target (for a failure message)."""
    return sorted(f"{m} -> {t}" for m, ts in module_graph().items() for t in ts
                  if _folder(m) == source and _folder(t) == target)


def find_cycles(graph: dict[str, list[str] | frozenset[str]]) -> list[list[str]]:
    """The cycles of the graph as paths (first node repeated at the end): for every node on a cycle, a shortest
    cycle through it, each cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graphs are small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles, seen = [], set()
    for component in components:
        for start in component:
            cycle = _cycle_through(start, set(component), graph)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def _cycle_through(start: str, inside: set[str], graph) -> list[str]:
    """A shortest cycle through `start`, staying inside its strongly connected component."""
    parents = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if w in inside and w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")


def _describe(cycles: list[list[str]], folders: bool = False) -> str:
    """One line a cycle; for folders, the module imports behind each of its edges beneath it."""
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        if folders:
            lines += [f"    {edge}" for a, b in zip(cycle, cycle[1:]) for edge in _module_edges(a, b)]
    return "\n".join(lines)


def test_every_code_folder_is_parsed():
    graph = module_graph()
    assert {"trainer", "planner", "kernels", "launch"} <= set(folders())
    assert {_folder(m) for m in graph} == {f for f, d in folders().items() if any(d.rglob("*.py"))}
    # The edges the rest of this file relies on are seen: relative, absolute and inside a function.
    assert "longtune.trainer.config" in graph["longtune.trainer.train"]
    assert any(_folder(t) == "trainer" for t in graph["longtune.launch.cli"])


def test_imports_in_functions_count_and_type_checking_ones_do_not():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from .a import x\nelse:\n    from .b import y\n"
                     "def f():\n    from .c import z\n    import longtune.d\n")
    found = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in _imports(tree)]
    assert found == ["typing", "b", "c", "longtune.d"]


def test_no_module_cycle():
    cycles = find_cycles(module_graph())
    assert not cycles, "import cycles among modules:\n" + _describe(cycles)


def test_no_folder_cycle():
    cycles = find_cycles(folder_graph())
    assert not cycles, "import cycles among folders (module edges beneath):\n" + _describe(cycles, folders=True)


def test_leaf_folders_import_no_other_folder():
    graph = module_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if _folder(m) in LEAVES for t in targets
                   if _folder(t) != _folder(m) and t not in LEAVES[_folder(m)])
    assert not wrong, "planner and kernels import no other longtune folder:\n" + "\n".join(wrong)
    allowed = [m for modules in LEAVES.values() for m in modules if m in graph]
    reach = {m: sorted(graph[m]) for m in allowed if graph[m]}
    assert not reach, f"what planner or kernels may import imports nothing of longtune: {reach}"


def test_the_runtime_reads_the_plan_not_the_planner():
    """offload/ sizes everything from the Plan object: of the planner it imports planner/plan.py (the Plan and the
    words plans are written in) and inventory.py's kernel fact (FlashAttention's own buffers), nothing else."""
    graph = module_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if _folder(m) == "offload" for t in targets
                   if _folder(t) == "planner" and t not in ("longtune.planner.plan", "longtune.planner.inventory"))
    assert not wrong, "\n".join(wrong)


def _lines(directory: Path) -> int:
    return sum(len(p.read_text(encoding="utf-8").splitlines())
               for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def _layers(graph: dict[str, list[str]]) -> list[str]:
    """The folders, each after every folder it imports (ties by name); with a cycle, its folders last, by name."""
    order, left = [], dict(graph)
    while left:
        ready = sorted(f for f, deps in left.items() if not set(deps) & set(left))
        if not ready:
            return order + sorted(left)
        order += ready
        for f in ready:
            del left[f]
    return order


def main() -> None:
    """The folder graph, for the README: each folder after what it imports, its lines of Python, its arrows."""
    graph = folder_graph()
    dirs = folders()
    width = max(map(len, graph))
    for folder in _layers(graph):
        arrow = f" -> {', '.join(graph[folder])}" if graph[folder] else ""
        print(f"{folder:<{width}} {_lines(dirs[folder]):>6} lines{arrow}")


if __name__ == "__main__":
    main()
