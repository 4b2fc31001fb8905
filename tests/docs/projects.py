"""Run pytest in a fresh project directory, as a user who installed Treadle would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def run_pytest(
    directory: Path, files: Mapping[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """Write ``files`` into ``directory`` with an empty ``pytest.ini`` (so no setting of
    ours, such as ``asyncio_mode = auto``, applies and the directory is the root), and
    run ``python -m pytest`` there. Treadle's plugin loads through its entry point, as
    it does for a user."""
    (directory / "pytest.ini").write_text("[pytest]\n")
    for name, text in files.items():
        (directory / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
