"""The README's example is real code: it runs and prints what its comment says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs_and_prints_the_documented_output() -> None:
    """The 20-line example completes its run and prints the output shown in the README."""
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    done = subprocess.run(
        [sys.executable, "-c", code.group(1)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "{'text': 'CONTENTS OF HTTPS://EXAMPLE.COM'}"
