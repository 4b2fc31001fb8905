"""``pip install treadle`` gives a working engine and CLI on SQLite, and ``treadle demo``
runs from the installed wheel, outside any source checkout.

The wheel is built once per module (``pip wheel --no-deps``, a few seconds). The fresh
virtualenv test installs it with its dependencies from the package index pip is
configured with, so it is marked slow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from treadle import __version__

ROOT = Path(__file__).resolve().parents[2]

COPY_IGNORE = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "*.db*")

DEFAULT_PATH = {"pydantic", "structlog", "sqlalchemy", "alembic", "aiosqlite", "typer", "rich"}
"""What the plain install needs: the engine, SQLite storage and migrations, the CLI."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the source: pip builds a local directory in place,
    and a ``build/`` tree inside the checkout would be a second ``treadle`` to mypy."""
    source = tmp_path_factory.mktemp("source") / "treadle"
    # symlinks=True: the checkout's .typing/treadle link (to the root) is copied as a link.
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (built,) = out.glob("treadle-*.whl")
    return built


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode().splitlines()


@pytest.mark.timeout(300)
def test_plain_install_requires_sqlite_storage_and_the_cli(wheel: Path) -> None:
    """Requires-Dist without an extra covers the default path; PostgreSQL, AWS and the
    benchmark stay extras; the old `sql` and `cli` extras still exist."""
    requirements = [
        Requirement(line.split(":", 1)[1].strip())
        for line in _metadata(wheel)
        if line.startswith("Requires-Dist:")
    ]
    plain = {r.name.lower() for r in requirements if r.marker is None}
    assert plain >= DEFAULT_PATH
    assert not plain & {"psycopg", "boto3", "dbos", "pytest"}
    extras = {
        line.split(":", 1)[1].strip()
        for line in _metadata(wheel)
        if line.startswith("Provides-Extra:")
    }
    assert extras >= {"sql", "cli", "postgres", "aws", "bench", "dev"}
    postgres = {r.name.lower() for r in requirements if r.marker and "postgres" in str(r.marker)}
    assert "psycopg" in postgres


@pytest.mark.timeout(300)
def test_wheel_ships_the_demo_workflow_and_the_migrations(wheel: Path) -> None:
    """The demo's pipeline and the Alembic migrations are in the wheel; the tests are not."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "treadle/examples/document_pipeline.py" in names
    assert "treadle/hosts/cli/demo.py" in names
    assert any(n.startswith("treadle/adapters/sql/migrations/versions/") for n in names)
    assert not any(n.startswith("treadle/tests/") for n in names)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_in_a_fresh_venv_runs_version_and_demo(wheel: Path, tmp_path: Path) -> None:
    """In a new virtualenv, `pip install <wheel>` (no extras) then `treadle --version` and
    `treadle demo` from a directory outside the checkout: every run completes and the
    demo leaves no file behind."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TREADLE_"))}
    treadle = str(venv / "bin" / "treadle")
    version = subprocess.run(
        [treadle, "--version"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"treadle {__version__}"
    demo = subprocess.run(
        [treadle, "demo"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "3/3 runs completed" in demo.stdout
    assert "deleted on exit" in demo.stdout
    assert list(elsewhere.iterdir()) == []
