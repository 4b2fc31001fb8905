"""The layering of DESIGN.md §1, proven on the source: who may import whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer -> top-level treadle packages it may import at runtime
ALLOWED: dict[str, set[str]] = {
    "kernel": {"kernel"},
    "ports": {"kernel", "ports"},
    "adapters": {"kernel", "ports", "adapters"},
    # TestEngine drives the worker's own tick and job path (``runtime``), not a copy.
    "testing": {"kernel", "ports", "adapters", "runtime", "testing"},
    "runtime": {"kernel", "ports", "adapters", "runtime"},
    # The remote worker client runs where there is no database: httpx and itself only.
    "remote": {"remote"},
    # The AI layer (the ``ai`` extra): agents and batch stages on the kernel's authoring API.
    "ai": {"kernel", "ports", "adapters", "ai"},
}
THIRD_PARTY_ALLOWED_IN_KERNEL = {"pydantic", "pydantic_core", "typing_extensions"}


def _runtime_imports(path: Path) -> list[str]:
    """Modules imported at runtime (imports under ``if TYPE_CHECKING:`` are types only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if not type_only:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return found


def _layer_files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    """Each layer imports only the treadle layers DESIGN.md §1 allows."""
    problems = []
    for path in _layer_files(layer):
        for module in _runtime_imports(path):
            parts = module.split(".")
            if parts[0] != "treadle":
                continue
            target = parts[1] if len(parts) > 1 else "<root>"
            if target not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert problems == []


def test_kernel_imports_only_stdlib_and_pydantic() -> None:
    """The kernel stays pure: standard library and pydantic only."""
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for path in _layer_files("kernel"):
        for module in _runtime_imports(path):
            top = module.split(".")[0]
            if top in ("treadle", "__future__") or top in stdlib:
                continue
            if top not in THIRD_PARTY_ALLOWED_IN_KERNEL:
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert problems == []


def test_nothing_imports_hosts() -> None:
    """Hosts sit on top: no other package imports ``treadle.hosts``."""
    problems = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("hosts", "tests", "benchmarks", "examples", ".venv", "build"):
            continue
        problems.extend(
            f"{rel} imports {module}"
            for module in _runtime_imports(path)
            if module.startswith("treadle.hosts")
        )
    assert problems == []


def test_import_has_no_side_effects() -> None:
    """Importing treadle configures no logging handlers and opens nothing."""
    code = (
        "import logging, structlog; before = list(logging.getLogger().handlers);"
        "import treadle, treadle.kernel, treadle.ports, treadle.adapters, treadle.testing;"
        "assert logging.getLogger().handlers == before, 'logging configured at import';"
        "assert not structlog.is_configured(), 'structlog configured at import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# Import cycles (issue 12): a module graph built from the AST, every import counted.
# ---------------------------------------------------------------------------------------


def _module_name(root: Path, path: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, package: str, subpackages: Sequence[str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in the file: at the top, inside
    functions, under ``if TYPE_CHECKING:``. Importing ``a.b.c`` also runs ``a/b``'s
    ``__init__``, so that counts as an import of ``a.b`` too, unless ``a.b`` contains the
    importer (a package is already initialising when its own modules load)."""
    files = {
        _module_name(root, path, package): path
        for sub in subpackages
        for path in sorted((root / sub).rglob("*.py"))
    }
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        own = set(_ancestors(module))
        edges = set()
        for target in targets:
            for name in [*_ancestors(target), target]:
                if name in known and name != module and name not in own:
                    edges.add(name)
        graph[module] = edges
    return graph


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("layer", ["kernel", "adapters"])
def test_layer_has_no_import_cycle(layer: str) -> None:
    """No module of the layer imports, directly or through others of the layer, a module
    that imports it back: a cycle means the shared names belong a floor down."""
    assert import_cycles(import_graph(ROOT, "treadle", [layer])) == []


def test_the_cycle_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    """The checker sees a cycle through a function-local import, one through a
    ``TYPE_CHECKING`` import, and one through a package ``__init__``."""
    pkg = tmp_path / "kernel"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from treadle.kernel import b\n")
    (pkg / "b.py").write_text("from treadle.kernel.a import f\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import X\n"
    )
    (pkg / "d.py").write_text("import treadle.kernel.c\n")
    (pkg / "sub" / "__init__.py").write_text("from treadle.kernel.e import y\n")
    (pkg / "sub" / "leaf.py").write_text("x = 1\n")
    (pkg / "e.py").write_text("from treadle.kernel.sub.leaf import x\ny = x\n")
    (pkg / "f.py").write_text("from treadle.kernel import a\n")
    cycles = import_cycles(import_graph(tmp_path, "treadle", ["kernel"]))
    assert cycles == [
        ["treadle.kernel.a", "treadle.kernel.b"],
        ["treadle.kernel.c", "treadle.kernel.d"],
        ["treadle.kernel.e", "treadle.kernel.sub"],
    ]


def _explicit_imports(root: Path, package: str, layer: str) -> set[tuple[str, str]]:
    """The import arrows written in the layer's files (no package ``__init__`` arrows)."""
    graph = import_graph(root, package, [layer])
    known = set(graph)
    arrows = set()
    for module, path in _layer_modules(root, package, layer):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                names = [n for n in submodules if n in known] or [node.module]
            arrows.update((module, n) for n in names if n in known and n != module)
    return arrows


def _layer_modules(root: Path, package: str, layer: str) -> list[tuple[str, Path]]:
    return [(_module_name(root, p, package), p) for p in sorted((root / layer).rglob("*.py"))]


def test_import_graph_tools_read_the_checkout() -> None:
    """grimp (import-linter's graph) finds ``treadle`` in this checkout and sees the
    same arrows inside the kernel as the AST: tools read the repository root as the
    package without a link made by a script (docs/architecture.md)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("treadle", cache_dir=None)
    assert graph.direct_import_exists(
        importer="treadle.kernel.kernel", imported="treadle.kernel.deps"
    )
    assert graph.chain_exists(importer="treadle.hosts.worker", imported="treadle.kernel.model")
    for layer in ("kernel", "adapters"):
        arrows = _explicit_imports(ROOT, "treadle", layer)
        assert arrows
        for importer, imported in arrows:
            assert graph.direct_import_exists(importer=importer, imported=imported), (
                f"{importer} -> {imported}"
            )
