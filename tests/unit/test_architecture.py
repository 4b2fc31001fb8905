"""The layering of DESIGN.md §1, proven on the source: who may import whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer -> top-level treadle packages it may import at runtime
ALLOWED: dict[str, set[str]] = {
    "kernel": {"kernel"},
    "ports": {"kernel", "ports"},
    "adapters": {"kernel", "ports", "adapters"},
    "testing": {"kernel", "ports", "adapters", "testing"},
    "runtime": {"kernel", "ports", "adapters", "runtime"},
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
