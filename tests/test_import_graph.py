"""No import cycle among the project's modules (``insight_core``, ``app``, ``precompute``).

The graph is read from the source with ``ast``: module-level imports, imports inside functions and
``TYPE_CHECKING`` blocks alike, since each of them still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("insight_core", "app", "precompute")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file (a package is its ``__init__.py``)."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    # `from pkg import name` imports pkg, and pkg.name when name is a submodule
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(root: Path, packages: tuple[str, ...]) -> nx.DiGraph:
    """Edges module -> imported project module, each with the ``line`` of its first import."""
    files = module_files(root, packages)
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(node, module, path.name == "__init__.py"):
                while name and name not in files:  # `a.b.attr` -> the module a.b
                    name = name.rpartition(".")[0]
                if name and name != module and not graph.has_edge(module, name):
                    graph.add_edge(module, name, line=node.lineno)
    return graph


def cycles(graph: nx.DiGraph) -> list[str]:
    """One cycle per strongly connected component, written ``a (line 3) -> b (line 9) -> a``."""
    found = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycle = nx.find_cycle(graph.subgraph(component))
            steps = (f"{a} (line {graph.edges[a, b]['line']})" for a, b in cycle)
            found.append(" -> ".join(steps) + f" -> {cycle[0][0]}")
    return sorted(found)


def test_the_project_has_no_import_cycle() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert graph.number_of_nodes() > 100  # the packages were found
    assert graph.has_edge("app.state", "insight_core.atlas")  # and their imports read
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_a_function_level_relative_import_cycle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "state.py").write_text("from pkg.sub.view import render\n")
    (pkg / "sub" / "view.py").write_text("def render():\n    from ..state import x\n    return x\n")
    (pkg / "leaf.py").write_text("import pkg.state\n")
    found = cycles(import_graph(tmp_path, ("pkg",)))
    assert len(found) == 1
    assert "pkg.state (line 1)" in found[0]
    assert "pkg.sub.view (line 2)" in found[0]
