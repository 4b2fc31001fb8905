"""What one ``run.claimPending`` of a run started elsewhere costs on PostgreSQL (issue 11,
idle-to-claim): round trips, statements and transactions on the wire, and the claiming
process's CPU time, per claim, for the unlocked claim (``tx.claim_candidates`` then one
``write_set``) and for the locking claim it falls back to (``--path locked`` sets the
persistence's ``claim_reads`` off), side by side in one invocation.

``--runs`` runs of a one-stage pipeline are started PENDING by a second ``Engine.open``
(as another process would), then claimed one at a time by the first engine's kernel
with ``chain=1`` (the first stage leased to the claimer and started, as an idle worker
claims), nothing else running. The counts are the wire's (see ``due_precision.py``'s
``Wire``): they do not depend on the machine's load; the CPU time does a little, the
wall time a lot (printed for reference only).

    .venv/bin/python benchmarks/claim_cost.py [--runs 200] [--pg-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from _common import fresh_database, pct, pg_version
from due_precision import Wire
from pydantic import BaseModel

from treadle import Engine, StageContext, WorkflowBuilder, define_stage
from treadle.kernel import commands as c


class N(BaseModel):
    n: int


@define_stage(id="mark", input=N, output=N)
async def mark(ctx: StageContext[N, None]) -> N:
    return ctx.input


PIPELINE = WorkflowBuilder("mark", input=N).pipe(mark).build()


async def measure(url: str, path: str, runs: int) -> dict[str, float]:
    worker = await Engine.open(url, workflows=[PIPELINE], auto_migrate=True)
    origin = await Engine.open(url, workflows=[PIPELINE])
    try:
        assert worker.backend is not None
        if path == "locked":
            worker.backend.persistence.claim_reads = False  # type: ignore[attr-defined]
        for i in range(runs + 5):
            await origin.start("mark", {"n": i})
        wire = Wire()
        wire.attach(worker)
        trips: list[float] = []
        statements: list[float] = []
        transactions: list[float] = []
        cpu: list[float] = []
        wall: list[float] = []
        for i in range(runs + 5):
            before = wire.snapshot()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = await worker.kernel.dispatch(
                c.RunClaimPending(worker_id="claimer", max_claims=1, chain=1)
            )
            cpu1, wall1 = time.process_time(), time.perf_counter()
            after = wire.snapshot()
            assert len(result.chained_jobs) == 1, result
            worker.kernel.deps.chains.clear()  # not executed: only the claim is measured
            if i < 5:
                continue  # warm-up: statements prepared, pool filled
            trips.append(after[0] - before[0])
            statements.append(after[1] - before[1])
            transactions.append(after[2] - before[2])
            cpu.append(cpu1 - cpu0)
            wall.append(wall1 - wall0)
    finally:
        await origin.aclose()
        await worker.aclose()
    return {
        "round trips": pct(trips, 0.5),
        "statements": pct(statements, 0.5),
        "transactions": pct(transactions, 0.5),
        "CPU ms p50": pct(cpu, 0.5) * 1000,
        "wall ms p50": pct(wall, 0.5) * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("TREADLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"claim_cost: {args.runs} claims per path, load {load}, PostgreSQL {pg_version(args.pg_url)}"
    )
    figures: dict[str, dict[str, Any]] = {}
    for path in ("locked", "unlocked"):
        with fresh_database("postgres", args.pg_url) as url:
            figures[path] = await measure(url, path, args.runs)
    print("| per claim (median) | locked | unlocked |\n|---|---|---|")
    for key in figures["locked"]:
        print(f"| {key} | {figures['locked'][key]:.2f} | {figures['unlocked'][key]:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
