"""The repo's import graph: who may import whom, and no import circle (docs/design.md §1).

Built from the sources, not by importing them: every `import` / `from ... import` statement of
harness/, dsv4/ and reference/ (at any depth: a lazy import inside a function is an edge too)
and every `importlib.import_module("literal")` call. `from pkg import name` is an edge to
`pkg.name` where that is a module, else to `pkg`; the implicit import of a module's parent
package is not an edge (a package `__init__` that re-exports its submodules would otherwise be a
circle). The built-in adapter table (harness/backends) names modules as data, loaded on demand
by name: a plugin lookup, not an import, so not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "dsv4", "reference")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imported_names(tree: ast.AST, package: str, modules: set[str]) -> list[str]:
    """Every dotted name a module's statements import (relative ones resolved); `from pkg import
    name` gives `pkg.name` where that is one of `modules`, else `pkg`."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names += [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def _statement_modules(tree: ast.AST) -> list[str]:
    """The modules named by absolute import statements (`from m import x` names m)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the repo modules it imports."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for name in _imported_names(ast.parse(p.read_text(), str(p)), package, set(mods)):
            if name in mods and name != m:
                graph[m].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return [*path[path.index(v) :], v]
            if v not in state and (found := visit(v)):
                return found
        path.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_repo_has_no_import_circle():
    graph = import_graph()
    assert "harness.stages.verdicts" in graph["harness.stages.run"]  # it saw the repo
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_a_circle_is_found_where_one_exists():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lazy_and_importlib_imports_are_edges():
    tree = ast.parse(
        "def f():\n    from harness import adapters\n"
        "importlib.import_module('dsv4.ops')\nfrom . import x\n"
    )
    names = _imported_names(tree, "harness.backends", {"harness.adapters", "harness.backends.x"})
    assert {"harness.adapters", "dsv4.ops", "harness.backends.x"} <= set(names)
    assert "harness" not in names and "harness.backends" not in names  # submodules, not parents


def test_dsv4_imports_nothing_of_the_harness_and_reference_nothing_of_either():
    """dsv4 is the production path: the harness reaches it through harness/backends/dsv4.py,
    never the other way. The oracle shares no code with what it judges (docs/design.md §1)."""
    forbidden = {"dsv4": ("harness", "reference"), "reference": ("harness", "dsv4")}
    bad = [
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        if t.split(".")[0] in forbidden.get(m.split(".")[0], ())
    ]
    # the graph holds repo modules only; any import statement naming a forbidden top package
    # (even one that does not exist any more) is caught here
    for pkg, tops in forbidden.items():
        for p in sorted((REPO / pkg).rglob("*.py")):
            for name in _statement_modules(ast.parse(p.read_text())):
                if name.split(".")[0] in tops:
                    bad.append(f"{p.relative_to(REPO)}: import {name}")
    assert not bad, bad


def test_the_harness_imports_only_dsv4s_public_modules_and_only_from_its_bridge():
    """Only harness/backends/dsv4.py knows dsv4, and only through dsv4.ops and dsv4.layers."""
    bad = []
    for p in sorted((REPO / "harness").rglob("*.py")):
        for name in _statement_modules(ast.parse(p.read_text())):
            if name.split(".")[0] != "dsv4":
                continue
            bridge = p.relative_to(REPO).as_posix() == "harness/backends/dsv4.py"
            if not (bridge and name in ("dsv4.ops", "dsv4.layers")):
                bad.append(f"{p.relative_to(REPO)}: import {name}")
    assert not bad, bad
