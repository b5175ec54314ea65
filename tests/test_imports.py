"""No import cycles in evonas/: each module reads those below it in the flow, never one that
reads it back (the driver reads the run folder's records, the report reads them too, and
neither reads the other). Imports inside functions count: they hide a cycle from Python's
import machinery, not from the design."""

import ast
from pathlib import Path

import evonas

PACKAGE = Path(evonas.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The evonas modules an import statement names: `from a.b import c` names a.b, and
    a.b.c when c is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package
            package = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join(package + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = (n for node in ast.walk(tree)
                 for n in imported(node, module, path.name == "__init__.py"))
        graph[module] = {n for n in names if n in paths and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part that has one (Tarjan's algorithm).
    The root package `evonas` is left out: every module imports it for its errors and
    version, and it imports none of them."""
    graph = {m: {n for n in out if n != "evonas"} for m, out in graph.items() if m != "evonas"}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # cli/search.py imports the driver only inside run_search
    assert "evonas.search.driver" in graph["evonas.cli.search"]
    assert "evonas.search.state" in graph["evonas.search.results"]


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_evonas():
    assert cycles(import_graph()) == []
