"""docs/deployment.md's "Invoking the handler locally" script runs as printed: its sample
SQS event, EventBridge event and fake context drive the real handler, and its one SQS
message runs a whole three-stage run (issue 13, item 18)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from treadle import Engine
from treadle.kernel.model import RunStatus

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"

FLOWS = """
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage


class Num(BaseModel):
    n: int


@define_stage(id="add", input=Num, output=Num)
async def add(ctx):
    return Num(n=ctx.input.n + 1)


@define_stage(id="double", input=Num, output=Num)
async def double(ctx):
    return Num(n=ctx.input.n * 2)


@define_stage(id="square", input=Num, output=Num)
def square(ctx):
    return Num(n=ctx.input.n ** 2)


workflows = [WorkflowBuilder("numbers", input=Num).pipe(add).pipe(double).pipe(square).build()]
"""


def _documented_script() -> str:
    """The python block of the guide that starts with ``# invoke_locally.py``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    [script] = [b for b in blocks if b.startswith("# invoke_locally.py")]
    return script


def test_documented_local_invocation_runs_a_whole_run_from_one_message(tmp_path: Path) -> None:
    """With ``myapp.flows`` holding a three-stage pipeline and one run started, the
    documented script prints the documented results, and the run is COMPLETED with all
    three stages done: the SQS message did not stop after the first stage."""
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "flows.py").write_text(FLOWS)
    (tmp_path / "invoke_locally.py").write_text(_documented_script())
    db = f"sqlite:///{tmp_path / 'local.db'}"
    sys.path.insert(0, str(tmp_path))
    try:
        from myapp.flows import workflows  # type: ignore[import-not-found]

        async def start() -> str:
            async with await Engine.open(db, workflows=workflows) as engine:
                return (await engine.start("numbers", {"n": 2})).run_id

        run_id = asyncio.run(start())
        env = {
            **os.environ,
            "TREADLE_DATABASE_URL": db,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(
            [sys.executable, "invoke_locally.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        # "0": the tick after the message found no job left to run.
        assert done.stdout.splitlines() == ["{'batchItemFailures': []}", "True 0"]

        async def finished() -> tuple[RunStatus, object, list[str]]:
            async with await Engine.open(db, workflows=workflows) as engine:
                run = await engine.get_run(run_id)
                return run.status, run.output, [s.status.value for s in run.stages]

        assert asyncio.run(finished()) == (RunStatus.COMPLETED, {"n": 36}, ["COMPLETED"] * 3)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("myapp.flows", None)
        sys.modules.pop("myapp", None)
