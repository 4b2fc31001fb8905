"""``scripts/_env.sh`` (behind demo.sh, test.sh and lint.sh) says what it does while it
sets up ``.venv``: the first install takes about a minute, and silence looks like a hang.

Run on a copy of the script in a scratch directory, with a stand-in interpreter whose
``pip install`` takes a few seconds, so nothing is installed for real."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
# python3 -m venv DIR: a .venv whose python's `pip install` prints and takes 3 s.
if [ "$1" = "--version" ]; then echo "Python 3.11.0"; exit 0; fi
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'INNER'
#!/usr/bin/env bash
echo "Collecting pydantic>=2.6"
sleep 3
echo "Successfully installed treadle"
INNER
chmod +x "$3/bin/python"
"""


def test_env_script_reports_progress_while_installing(tmp_path: Path) -> None:
    """It says it creates .venv, that it installs (naming the log), a still-installing
    line with the latest pip step while pip runs, and how long the install took; a
    second run with an installed .venv says nothing."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "_env.sh", tmp_path / "scripts" / "_env.sh")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PYTHON": str(fake), "TREADLE_INSTALL_PROGRESS_SECONDS": "1"}
    script = f"source {tmp_path / 'scripts' / '_env.sh'}"
    first = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0] == "[treadle] creating .venv with Python 3.11.0 ..."
    assert "installing Treadle and its dependencies into .venv" in lines[1]
    assert ".venv/install.log" in lines[1]
    assert any("still installing" in line and "Collecting pydantic" in line for line in lines)
    assert lines[-1].startswith("[treadle] installed in ")
    again = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 0
    assert again.stderr == ""
