"""A worker process for ``test_concurrency.py`` (run as a script, not collected by pytest).

Opens the database, runs one ``Worker`` with ``--concurrency`` slots, prints ``ready``
once it is polling, and keeps working until ``--runs`` runs are terminal. Every stage
execution is recorded (run, stage, attempt, pid, wall-clock start and end) and written
as JSON lines to ``--out`` on exit, so the test can prove no stage ran twice at once.

    python tests/integration/concurrency_worker.py --url URL --runs N --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage

WORKFLOW_ID = "concurrency-3"
RECORDS: list[dict[str, Any]] = []


class Num(BaseModel):
    n: int


def _stage(stage_id: str) -> Any:
    @define_stage(id=stage_id, input=Num, output=Num)
    async def body(ctx):  # type: ignore[no-untyped-def]
        started = time.time()
        await asyncio.sleep(0.001)  # a non-zero window in which an overlap would show
        RECORDS.append(
            {
                "run_id": ctx.run_id,
                "stage_id": ctx.stage_id,
                "attempt": ctx.attempt,
                "pid": os.getpid(),
                "start": started,
                "end": time.time(),
            }
        )
        return Num(n=ctx.input.n + 1)

    return body


PIPELINE = (
    WorkflowBuilder(WORKFLOW_ID, input=Num)
    .pipe(_stage("first"))
    .pipe(_stage("second"))
    .pipe(_stage("third"))
    .build()
)


async def _terminal(engine: Engine) -> int:
    counts = await engine.aggregate("status")
    return sum(counts.get(s, 0) for s in ("COMPLETED", "FAILED", "CANCELLED"))


async def main(url: str, runs: int, out: str, concurrency: int, deadline: float) -> int:
    engine = await Engine.open(url, workflows=[PIPELINE])
    try:
        async with engine.worker(
            concurrency=concurrency,
            orchestration_interval=0.1,
            job_poll_interval=0.05,
            max_claims=20,
        ):
            print("ready", flush=True)
            give_up = time.monotonic() + deadline
            while await _terminal(engine) < runs:
                if time.monotonic() > give_up:
                    print("deadline passed before all runs finished", file=sys.stderr)
                    return 2
                await asyncio.sleep(0.1)  # polling the database for the end condition
    finally:
        lines = "".join(json.dumps(record) + "\n" for record in RECORDS)
        await asyncio.to_thread(Path(out).write_text, lines)
        await engine.aclose()
    return 0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=100.0)
    return parser.parse_args()


if __name__ == "__main__":
    args = _parse()
    sys.exit(asyncio.run(main(args.url, args.runs, args.out, args.concurrency, args.deadline)))
