"""The package's import graph: no cycles among module-level imports, a light start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env

PACKAGE = REPO / "search"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions, not under
    `if TYPE_CHECKING:`; class bodies, `try`, `with` and other `if`s do run."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                found += _module_level_imports(block)
            for handler in node.handlers:
                found += _module_level_imports(handler.body)
        elif isinstance(node, ast.With | ast.ClassDef):
            found += _module_level_imports(node.body)
    return found


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports at module level."""
    modules = {_module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name} | (
            {name} if name in targets and not is_package else set()
        )
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycle_among_the_package_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        ({"a": "from pkg import b", "b": "import pkg.c", "c": "from pkg.a import x"},
         ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]),
        ({"a": "from . import b", "b": "from .a import x"}, ["pkg.a", "pkg.b", "pkg.a"]),
        ({"a": "from pkg import b", "b": "def f():\n    from pkg import a"}, None),
        ({"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b",
          "b": "from pkg import a"}, None),
        ({"a": "try:\n    from pkg import b\nexcept ImportError:\n    pass",
          "b": "from pkg import a"}, ["pkg.a", "pkg.b", "pkg.a"]),
    ],
    ids=["three-modules", "relative", "function-level-ignored", "type-checking-ignored",
         "try-counts"],
)
def test_the_cycle_finder_sees_module_level_imports_only(
    tmp_path: Path, sources: dict[str, str], cycle: list[str] | None
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in sources.items():
        (package / f"{name}.py").write_text(text + "\n")
    assert find_cycle(import_graph(package)) == cycle


@pytest.mark.parametrize("module", ["search", "search.cli"])
def test_importing_the_package_or_the_cli_loads_no_heavy_library(module: str) -> None:
    """`search --help` and usage errors start fast: Optuna, SQLAlchemy, pydantic and torch
    load on first use of a public name or command, not on import."""
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in ('optuna', 'sqlalchemy', 'pydantic', 'torch', 'sklearn') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=cli_env(), check=True)
    assert result.stdout.strip() == "[]"


def test_public_names_load_on_first_use() -> None:
    import search

    assert set(search.__all__) == set(search._HOMES)
    for name in search.__all__:
        assert getattr(search, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        search.nope  # noqa: B018
