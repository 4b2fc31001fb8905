"""`pip install .` ships every package and the typing marker."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())
SKIP = {"tests", "benchmarks", "docs", "build", "scripts"}


def test_every_package_directory_is_listed_for_the_wheel() -> None:
    """Each directory with an ``__init__.py`` is in ``[tool.setuptools] packages``."""
    listed = set(CONFIG["tool"]["setuptools"]["packages"])
    found = {"treadle"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if not rel.parts or rel.parts[0] in SKIP or rel.parts[0].startswith("."):
            continue
        found.add("treadle." + ".".join(rel.parts))
    assert found - listed == set()


def test_py_typed_ships() -> None:
    """The PEP 561 marker exists and is declared as package data."""
    assert (ROOT / "py.typed").exists()
    assert "py.typed" in CONFIG["tool"]["setuptools"]["package-data"]["treadle"]


def test_pytest_plugin_entry_point_is_declared() -> None:
    """The pytest11 entry point points at the harness plugin module."""
    entry = CONFIG["project"]["entry-points"]["pytest11"]["treadle"]
    assert entry == "treadle.testing.plugin"


def test_dashboard_templates_and_static_files_ship() -> None:
    """Every template and static file of the dashboard matches a package-data pattern
    of ``treadle.hosts.http`` (a wheel without them serves broken pages)."""
    patterns = CONFIG["tool"]["setuptools"]["package-data"]["treadle.hosts.http"]
    base = ROOT / "hosts" / "http"
    files = [
        p.relative_to(base)
        for folder in ("templates", "static")
        for p in (base / folder).rglob("*")
        if p.is_file()
    ]
    assert files
    missing = [str(f) for f in files if not any(f.match(pattern) for pattern in patterns)]
    assert missing == []
