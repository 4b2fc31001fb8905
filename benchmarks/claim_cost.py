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

``--server-log FILE`` (the PostgreSQL server's log, readable): the benchmark's own
databases get ``log_min_duration_statement = 0`` (a per-database setting), and the
server time per claim is the sum of the durations the server logged for them (parse,
bind, execute, BEGIN, COMMIT) while the claims ran, divided by the claims.

    .venv/bin/python benchmarks/claim_cost.py [--runs 200] [--pg-url postgresql://...]
        [--server-log /var/log/postgresql/postgresql-15-main.log]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from typing import Any

import sqlalchemy as sa
from _common import fresh_database, libpq_url, pct, pg_version
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


DURATION = re.compile(r"duration: ([0-9.]+) ms")


def _log_statements(url: str) -> str:
    """Make the server log every statement of ``url``'s database (new sessions only);
    returns the database's name."""
    import psycopg

    name = sa.make_url(url).database
    assert name is not None
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET log_min_duration_statement = 0')
    return name


def _log_size(log: str) -> int:
    return os.path.getsize(log)


def _server_ms(log: str, offset: int, database: str) -> float:
    """Milliseconds the server logged for ``database``'s statements past ``offset``."""
    total = 0.0
    marker = f"@{database} "
    with open(log, errors="replace") as fh:
        fh.seek(offset)
        for line in fh:
            if marker in line:
                found = DURATION.search(line)
                if found is not None:
                    total += float(found.group(1))
    return total


async def measure(url: str, path: str, runs: int, log: str | None) -> dict[str, float]:
    database = _log_statements(url) if log is not None else ""
    worker = await Engine.open(url, workflows=[PIPELINE], auto_migrate=True)
    origin = await Engine.open(url, workflows=[PIPELINE])
    server = 0.0
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
        offset = 0
        for i in range(runs + 5):
            if i == 5 and log is not None:
                offset = _log_size(log)
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
        if log is not None:
            await asyncio.sleep(0.5)  # the server's log writer catches up
            server = _server_ms(log, offset, database) / runs
    finally:
        await origin.aclose()
        await worker.aclose()
    figures = {
        "round trips": pct(trips, 0.5),
        "statements": pct(statements, 0.5),
        "transactions": pct(transactions, 0.5),
        "CPU ms p50": pct(cpu, 0.5) * 1000,
        "wall ms p50": pct(wall, 0.5) * 1000,
    }
    if log is not None:
        figures["server ms (mean)"] = server
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("TREADLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--server-log", default=None)
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    version = pg_version(args.pg_url)
    print(f"claim_cost: {args.runs} claims per path, load {load}, PostgreSQL {version}")
    figures: dict[str, dict[str, Any]] = {}
    for path in ("locked", "unlocked"):
        with fresh_database("postgres", args.pg_url) as url:
            figures[path] = await measure(url, path, args.runs, args.server_log)
    print("| per claim (median) | locked | unlocked |\n|---|---|---|")
    for key in figures["locked"]:
        print(f"| {key} | {figures['locked'][key]:.2f} | {figures['unlocked'][key]:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
