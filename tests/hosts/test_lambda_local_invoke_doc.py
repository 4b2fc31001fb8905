"""docs/deployment.md's "Invoking the handler locally" script runs as printed: its sample
SQS event, EventBridge event and fake context drive the real handler, and its one SQS
message runs every stage of a three-stage run (issue 13, item 18)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"

# ``print(...)  # what it prints``: the comment a reader takes for the output.
_PRINTED = re.compile(r"^\s*print\(.*\)\s+#\s?(?P<said>.*)$", re.M)


def _documented_script() -> str:
    """The python block of the guide that starts with ``# invoke_locally.py``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    [script] = [b for b in blocks if b.startswith("# invoke_locally.py")]
    return script


def test_documented_local_invocation_runs_a_whole_run_from_one_message(tmp_path: Path) -> None:
    """The script, saved and run with ``python`` in an empty directory, prints exactly
    what its comments say: no batch failure, all three stages COMPLETED after the one
    SQS message (not only the first), and a tick with nothing left to process."""
    script = _documented_script()
    (tmp_path / "invoke_locally.py").write_text(script)
    done = subprocess.run(
        [sys.executable, "invoke_locally.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    said = [m["said"] for m in _PRINTED.finditer(script)]
    assert said == [
        "{'batchItemFailures': []}",
        "['COMPLETED', 'COMPLETED', 'COMPLETED']",
        "True 0",
    ]
    assert done.stdout.splitlines() == said
