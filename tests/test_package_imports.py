"""The package's imports run one way: no import cycle, no private name imported across modules,
and imports of the package's own modules at the top of a module.

The package is read with :mod:`ast` (nothing is imported), so a cycle that Python happens to
tolerate (a partially initialised module whose names are only used later) is still found.

- Private: a name starting with ``_`` taken from another module of the package, by ``from m
  import _x`` or as ``m._x`` on an imported module, fails. Dunder names (``__version__``,
  ``__all__``) are Python's special names, public by convention (PEP 8), and pass.
- Cycles: among module-level imports (a class body and ``try`` count; ``if TYPE_CHECKING:``
  and function bodies do not). Importing ``a.b.c`` runs the packages ``a.b`` and ``a`` first,
  so it depends on their ``__init__`` too, except where those already enclose the importer.
- Function-level: an import of one of the package's modules inside a function hides an edge of
  this graph; each one needs an entry in :data:`FUNCTION_LEVEL_ALLOWED` with its reason.
  Third-party imports (optional dependencies) may stay inside functions.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "sirf_fbsem"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

#: (importing module, imported module) -> why the import stays inside a function (empty: every
#: import of a package module is at a module's top, where the cycle check sees it).
FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted name of the importing module
    target: str  # dotted name of the package module imported (the submodule for ``from . import sub``)
    name: str | None  # the name taken from ``target`` (None: the module itself)
    scope: str  # "module", "type_checking" or "function"
    line: int


def package_modules(package_dir: Path, package: str) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package by its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body: list[ast.stmt], scope: str) -> Iterator[tuple[ast.stmt, str]]:
    """Every statement under ``body`` with its scope (a function body is 'function' however deep)."""
    for node in body:
        yield node, scope
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _statements(node.body, "function")
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test) and scope == "module":
            yield from _statements(node.body, "type_checking")
            yield from _statements(node.orelse, scope)
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field, None) or []:
                if isinstance(child, (ast.ExceptHandler, getattr(ast, "match_case", ast.ExceptHandler))):
                    yield from _statements(child.body, scope)
                elif isinstance(child, ast.stmt):
                    yield from _statements([child], scope)


def _resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _deepest_module(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def module_imports(module: str, path: Path, modules: dict[str, Path], package: str) -> tuple[list[Import], list[tuple[int, str]]]:
    """The module's imports of the package's own modules, and the private names it reads from
    modules it imported as ``alias._name`` (line, description)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    imports: list[Import] = []
    aliases: dict[str, str] = {}  # local name bound to a package module -> that module
    for node, scope in _statements(tree.body, "module"):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _in_package(alias.name, package):
                    continue
                target = _deepest_module(alias.name, modules)
                imports.append(Import(module, target, None, scope, node.lineno))
                if alias.asname:
                    aliases[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, is_package, node)
            if not _in_package(source, package):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    imports.append(Import(module, sub, None, scope, node.lineno))
                    aliases[alias.asname or alias.name] = sub
                else:
                    imports.append(Import(module, _deepest_module(source, modules),
                                          None if alias.name == "*" else alias.name, scope, node.lineno))
    private_reads = [
        (node.lineno, f"{node.value.id}.{node.attr} ({aliases[node.value.id]})")
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and aliases[node.value.id] != module and is_private(node.attr)
    ]
    return imports, private_reads


def is_private(name: str) -> bool:
    """PEP 8: a leading underscore marks a name internal to its module; ``__dunder__`` names are not."""
    return name.startswith("_") and not (len(name) > 4 and name.startswith("__") and name.endswith("__"))


def package_imports(package_dir: Path, package: str) -> tuple[dict[str, Path], list[Import], list[str]]:
    modules = package_modules(package_dir, package)
    imports: list[Import] = []
    private_reads: list[str] = []
    for module, path in modules.items():
        found, reads = module_imports(module, path, modules, package)
        imports += found
        private_reads += [f"{module}:{line}: reads {what}" for line, what in reads]
    return modules, imports, private_reads


def private_imports(package_dir: Path, package: str) -> list[str]:
    """Every private name one module of the package takes from another."""
    _, imports, private_reads = package_imports(package_dir, package)
    found = [
        f"{imp.importer}:{imp.line}: imports {imp.name} from {imp.target}"
        for imp in imports
        if imp.target != imp.importer and (
            (imp.name is not None and is_private(imp.name))
            or any(is_private(part) for part in imp.target.split(".")[1:]))
    ]
    return found + private_reads


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package modules that importing it runs first (module-level imports, with the
    ``__init__`` of each package entered on the way that does not already enclose the importer)."""
    modules, imports, _ = package_imports(package_dir, package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.scope != "module":
            continue
        graph[imp.importer].add(imp.target)
        enclosing = {imp.importer.rsplit(".", k)[0] for k in range(imp.importer.count(".") + 1)}
        parent = imp.target
        while "." in parent:
            parent = parent.rsplit(".", 1)[0]
            if parent not in enclosing:
                graph[imp.importer].add(parent)
    return graph


def import_cycles(package_dir: Path, package: str) -> list[list[str]]:
    """The strongly connected components of the module-level import graph that are cycles."""
    graph = import_graph(package_dir, package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def function_level_imports(package_dir: Path, package: str,
                           allowed: dict[tuple[str, str], str]) -> list[str]:
    """Imports of the package's modules inside functions that ``allowed`` does not list."""
    _, imports, _ = package_imports(package_dir, package)
    found = [f"{imp.importer}:{imp.line}: imports {imp.target} inside a function"
             for imp in imports if imp.scope == "function" and (imp.importer, imp.target) not in allowed]
    return list(dict.fromkeys(found))


# -- the package ---------------------------------------------------------------------------------


def test_the_checker_sees_the_package():
    modules, imports, _ = package_imports(PACKAGE_DIR, PACKAGE)
    assert {"sirf_fbsem.geometry", "sirf_fbsem.io.listmode", "sirf_fbsem.projectors"} <= set(modules)
    assert len(imports) > 100
    assert "sirf_fbsem.geometry" in import_graph(PACKAGE_DIR, PACKAGE)["sirf_fbsem.projectors.base"]


def test_no_private_name_is_imported_across_modules():
    assert private_imports(PACKAGE_DIR, PACKAGE) == []


def test_no_import_cycle():
    assert import_cycles(PACKAGE_DIR, PACKAGE) == []


def test_package_modules_are_imported_at_the_top():
    assert function_level_imports(PACKAGE_DIR, PACKAGE, FUNCTION_LEVEL_ALLOWED) == []


def test_allow_list_is_current_and_explained():
    _, imports, _ = package_imports(PACKAGE_DIR, PACKAGE)
    used = {(imp.importer, imp.target) for imp in imports if imp.scope == "function"}
    for key, reason in FUNCTION_LEVEL_ALLOWED.items():
        assert key in used, f"{key} is allowed but no longer imported inside a function"
        assert reason.strip(), key


# -- the checker, on a synthetic package ---------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _write(tmp_path, {
        "__init__.py": "",
        "low.py": "def _helper(): pass\nCONST = 1\n",
        "mid.py": "from typing import TYPE_CHECKING\nfrom .low import CONST\nif TYPE_CHECKING:\n    from .top import T\n",
        "top.py": "import pkg.mid\nfrom . import low\nT = 1\n\ndef f():\n    import json\n    return json\n",
        "sub/__init__.py": "from .leaf import LEAF\n",
        "sub/leaf.py": "from ..mid import CONST\nLEAF = CONST\n",
    })


def test_checker_passes_a_clean_package(tiny):
    assert private_imports(tiny, "pkg") == []
    assert import_cycles(tiny, "pkg") == []  # mid -> top under TYPE_CHECKING only
    assert function_level_imports(tiny, "pkg", {}) == []  # json is not the package's
    graph = import_graph(tiny, "pkg")
    assert graph["pkg.top"] == {"pkg.mid", "pkg.low"}
    assert graph["pkg.sub.leaf"] == {"pkg.mid"}  # pkg.sub encloses the importer


def test_checker_finds_a_private_import(tiny):
    (tiny / "mid.py").write_text("from .low import CONST, _helper\n")
    (tiny / "sub" / "leaf.py").write_text("from .. import low\nLEAF = low._helper\n")
    (tiny / "top.py").write_text("from pkg import __version__\nimport pkg.low as l\nx = l.CONST, l.__all__\n")
    found = private_imports(tiny, "pkg")
    assert len(found) == 2, found
    assert found[0].startswith("pkg.mid:1: imports _helper from pkg.low")
    assert "low._helper (pkg.low)" in found[1]


def test_checker_finds_a_cycle(tiny):
    (tiny / "low.py").write_text("try:\n    from .top import T\nexcept ImportError:\n    pass\n")
    assert import_cycles(tiny, "pkg") == [["pkg.low", "pkg.mid", "pkg.top"]]


def test_checker_finds_a_cycle_through_a_package_init(tiny):
    # importing pkg.sub.leaf runs pkg.sub first, whose __init__ imports leaf's importer
    (tiny / "sub" / "__init__.py").write_text("from ..top import T\n")
    (tiny / "mid.py").write_text("from .sub.leaf import LEAF\n")
    (tiny / "sub" / "leaf.py").write_text("LEAF = 1\n")
    assert import_cycles(tiny, "pkg") == [["pkg.mid", "pkg.sub", "pkg.top"]]


def test_checker_finds_a_function_level_import_and_honours_the_allow_list(tiny):
    (tiny / "low.py").write_text("class C:\n    def m(self):\n        from .top import T\n        return T\n")
    found = function_level_imports(tiny, "pkg", {})
    assert found == ["pkg.low:3: imports pkg.top inside a function"]
    assert function_level_imports(tiny, "pkg", {("pkg.low", "pkg.top"): "a reason"}) == []
    # and the function-level edge is not a module-level one: no cycle
    assert import_cycles(tiny, "pkg") == []


def test_tests_mirror_the_package_layout():
    """tests/<sub>/ holds the tests of sirf_fbsem/<sub>/ (every subpackage has one); tests of top-level
    modules, the CLI and the documents stay in tests/."""
    tests_dir = Path(__file__).resolve().parent
    subpackages = {p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").is_file()}
    test_dirs = {p.name for p in tests_dir.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert test_dirs == subpackages, (sorted(test_dirs), sorted(subpackages))
    names = [p.name for p in tests_dir.rglob("test_*.py")]
    assert len(names) == len(set(names)), "test file names must be unique (pytest's default import mode)"
