"""Client cost of the set-oriented writes of the SQL adapter, per call and per row.

Group commit (docs/architecture.md) sends a group's writes through ``update_stages``,
``update_runs``, ``append_events``, ``SqlJobTransport.enqueue``, ``complete_many`` and
``put_idempotency_many``. This times each of them for N rows (N in 1, 8, 32) on a
fresh PostgreSQL database, inside an open transaction (BEGIN and COMMIT are not
counted), and prints the median wall time per call and per row and the mean CPU time
of this process per call: the client's share, which the server's work does not
inflate. The single-row forms (``update_stage``, ``update_run``, ``put_idempotency``)
are timed too, for comparison with their set-oriented form at N = 1.

The machine may be shared: compare medians of runs made back to back.

    .venv/bin/python benchmarks/sql_bulk.py [--reps 200] [--sizes 1,8,32]
        [--pg-url postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from treadle.adapters.sql import SqlBlobStore, SqlJobTransport, SqlPersistence, SqlTransaction
from treadle.adapters.sql.payloads import DEFAULT_PAYLOAD_MAX_BYTES
from treadle.kernel.events import StageCompleted
from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
    Job,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
)
from treadle.testing.databases import postgres_database

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OUTPUT = {"n": 1, "items": [1, 2, 3], "label": "café"}


class Fixture:
    """N runs with one stage each, rewritten in place rep after rep."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs = [
            Run(
                id=f"r{size}-{i:03}",
                workflow_id="wf",
                created_at=T0,
                updated_at=T0,
                input={"n": i},
                status=RunStatus.RUNNING,
            )
            for i in range(size)
        ]
        self.stages = [
            StageRun(workflow_run_id=run.id, stage_id="s0", execution_group=0) for run in self.runs
        ]
        self.counter = 0

    def next_stages(self) -> list[StageRun]:
        self.counter += 1
        now = T0 + timedelta(microseconds=self.counter)
        return [
            stage.model_copy(
                update={
                    "status": StageStatus.COMPLETED,
                    "output": OUTPUT,
                    "started_at": now,
                    "completed_at": now,
                    "poll_interval": timedelta(seconds=5),
                    "job_id": f"j-{stage.workflow_run_id}",
                }
            )
            for stage in self.stages
        ]

    def next_runs(self) -> list[Run]:
        self.counter += 1
        now = T0 + timedelta(microseconds=self.counter)
        return [run.model_copy(update={"updated_at": now}) for run in self.runs]

    def events(self) -> list[Any]:
        return [
            StageCompleted(
                workflow_run_id=run.id,
                stage_id="s0",
                attempt=1,
                output=OUTPUT,
                duration=timedelta(milliseconds=3),
                timestamp=T0,
            )
            for run in self.runs
        ]

    def jobs(self) -> list[Job]:
        self.counter += 1
        return [
            Job(
                id=f"j{self.size}-{self.counter}-{i}",
                workflow_run_id=run.id,
                workflow_id="wf",
                stage_id="s1",
                next_poll_at=T0,
                enqueued_at=T0,
            )
            for i, run in enumerate(self.runs)
        ]

    def records(self) -> list[IdempotencyRecord]:
        self.counter += 1
        return [
            IdempotencyRecord(
                key=f"k{self.size}-{i}",
                command_type="job.execute",
                state=IdempotencyState.COMPLETED,
                result={"ok": self.counter},
                started_at=T0,
            )
            for i in range(self.size)
        ]


async def time_op(
    persistence: SqlPersistence,
    reps: int,
    prepare: Callable[[], Any],
    op: Callable[[SqlTransaction, Any], Awaitable[Any]],
    after: Callable[[Any], None] = lambda result: None,
) -> tuple[float, float]:
    """(median wall µs, mean CPU µs) of ``op`` over ``reps`` transactions (after 10 warm-up
    ones); ``prepare`` builds the op's arguments outside the timed span."""
    walls: list[float] = []
    cpu_total = 0.0
    for rep in range(reps + 10):
        argument = prepare()
        async with persistence.transaction() as tx:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = await op(tx, argument)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        after(result)
        if rep >= 10:
            walls.append(wall)
            cpu_total += cpu
    return statistics.median(walls) * 1e6, cpu_total / reps * 1e6


async def bench(url: str, reps: int, sizes: list[int]) -> None:
    persistence = await SqlPersistence.open(url)
    # As Engine.open configures it: JSON values are measured for the payload offload.
    persistence.offload_payloads(SqlBlobStore(persistence), max_bytes=DEFAULT_PAYLOAD_MAX_BYTES)
    transport = SqlJobTransport(persistence)
    print(f"{'operation':<26}{'N':>4}{'µs/call':>10}{'µs/row':>9}{'CPU µs/call':>13}")
    try:
        for size in sizes:
            fx = Fixture(size)
            async with persistence.transaction() as tx:
                for run in fx.runs:
                    await tx.runs.insert(run)
                await tx.stages.insert_many(fx.stages)

            def keep_stages(result: Any, fx: Fixture = fx) -> None:
                fx.stages = list(result)

            def keep_runs(result: Any, fx: Fixture = fx) -> None:
                fx.runs = list(result)

            async def one_stage(tx: SqlTransaction, stages: list[StageRun]) -> list[StageRun]:
                return [await tx.stages.update(stages[0])]

            async def one_run(tx: SqlTransaction, runs: list[Run]) -> list[Run]:
                return [await tx.runs.update(runs[0])]

            async def one_record(tx: SqlTransaction, records: list[IdempotencyRecord]) -> None:
                await tx.idempotency.put(records[0])

            async def enqueue(tx: SqlTransaction, jobs: list[Job]) -> None:
                await transport.enqueue(tx, jobs)

            async def complete(tx: SqlTransaction, job_ids: list[str]) -> None:
                await transport.complete_many(tx, job_ids)

            cases: list[tuple[str, Callable[[], Any], Any, Callable[[Any], None]]] = [
                (
                    "update_stages",
                    fx.next_stages,
                    lambda tx, a: tx.stages.update_many(a),
                    keep_stages,
                ),
                ("update_runs", fx.next_runs, lambda tx, a: tx.runs.update_many(a), keep_runs),
                ("append_events", fx.events, lambda tx, a: tx.outbox.append(a), lambda r: None),
                ("enqueue", fx.jobs, enqueue, lambda r: None),
                (
                    "put_idempotency_many",
                    fx.records,
                    lambda tx, a: tx.idempotency.put_many(a),
                    lambda r: None,
                ),
            ]
            if size == 1:
                cases += [
                    ("update_stage (single)", fx.next_stages, one_stage, keep_stages),
                    ("update_run (single)", fx.next_runs, one_run, keep_runs),
                    ("put_idempotency (single)", fx.records, one_record, lambda r: None),
                ]
            for name, prepare, op, after in cases:
                wall, cpu = await time_op(persistence, reps, prepare, op, after)
                print(f"{name:<26}{size:>4}{wall:>10.0f}{wall / size:>9.1f}{cpu:>13.0f}")
            # complete_many needs jobs that exist: enqueue them untimed first.
            ids_batches: list[list[str]] = []
            for _ in range(reps + 10):
                jobs = fx.jobs()
                async with persistence.transaction() as tx:
                    await transport.enqueue(tx, jobs)
                ids_batches.append([job.id for job in jobs])
            wall, cpu = await time_op(persistence, reps, ids_batches.pop, complete)
            print(f"{'complete_many':<26}{size:>4}{wall:>10.0f}{wall / size:>9.1f}{cpu:>13.0f}")
    finally:
        await persistence.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with postgres_database(migrate=True, server_url=args.pg_url, prefix="treadle_bench") as url:
        asyncio.run(bench(url, args.reps, sizes))


if __name__ == "__main__":
    main()
