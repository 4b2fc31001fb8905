"""A worker process for ``test_flow_control_processes.py`` (run as a script).

Like ``concurrency_worker.py``: one ``Worker`` with ``--concurrency`` slots on a shared
database, ``ready`` once polling, working until ``--runs`` runs are terminal. Each stage
execution is recorded (run, stage, concurrency key, pid, wall-clock start and end) and
written as JSON lines to ``--out``, so the test can measure how many runs held a slot
at once, per key and in all; the rated workflow's runs show how many started per second.

    python tests/integration/limits_worker.py --url URL --runs N --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.kernel.flow_control import RateLimit

WORKFLOW_ID = "limited"
PER_KEY = 2
TOTAL = 3
RATED_ID = "rated"
RATE = RateLimit(4, per=timedelta(seconds=1))
RECORDS: list[dict[str, Any]] = []


class Job(BaseModel):
    key: str


def _stage(stage_id: str) -> Any:
    @define_stage(id=stage_id, input=Job, output=Job)
    async def body(ctx):  # type: ignore[no-untyped-def]
        started = time.time()
        await asyncio.sleep(0.03)  # long enough for an over-admitted run to overlap
        RECORDS.append(
            {
                "run_id": ctx.run_id,
                "stage_id": ctx.stage_id,
                "key": ctx.input.key,
                "pid": os.getpid(),
                "start": started,
                "end": time.time(),
            }
        )
        return ctx.input

    return body


PIPELINE = (
    WorkflowBuilder(WORKFLOW_ID, input=Job, concurrency=TOTAL, concurrency_per_key=PER_KEY)
    .pipe(_stage("first"))
    .pipe(_stage("second"))
    .build()
)
RATED = WorkflowBuilder(RATED_ID, input=Job, rate_limit=RATE).pipe(_stage("only")).build()


async def _terminal(engine: Engine) -> int:
    counts = await engine.aggregate("status")
    return sum(counts.get(s, 0) for s in ("COMPLETED", "FAILED", "CANCELLED"))


async def main(url: str, runs: int, out: str, concurrency: int, deadline: float) -> int:
    engine = await Engine.open(url, workflows=[PIPELINE, RATED])
    try:
        async with engine.worker(
            concurrency=concurrency, orchestration_interval=0.2, job_poll_interval=0.05
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
        await engine.close()
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
