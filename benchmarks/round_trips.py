"""Statements and round trips per stage on PostgreSQL, counted on the wire (issue 11).

``--runs`` runs of a 3-stage no-op pipeline (``--workflow code``: a code workflow of 3
no-op steps; per stage then reads per step), one at a time (start, then result), by the
in-process worker, after a few unmeasured ones. libpq's protocol trace of every pooled
connection (``PGconn.trace``) records what the client sent and received; counted over
the measured runs and divided by their stages:

* *statements*: ``Query`` (simple protocol: psycopg's BEGIN and COMMIT) and ``Bind``
  (extended protocol: every executed statement) messages sent;
* *round trips*: ``ReadyForQuery`` messages received (one per request the client
  waits for);
* *BEGIN* and *COMMIT*: those sent as their own requests.

``--bulk N`` counts the bulk path instead: N runs started with ``engine.start_many``
(not counted), then drained by the in-process worker at ``--concurrency`` (32), the
drain's statements and round trips divided by its stages (claims, group commits,
dequeues, the worker's ticks and the outbox flushes they run, all included).

The LISTEN connection (``adapters/sql/listener.py``) is not pooled and not counted.
Wall times are not the point (see ``versus_dbos.py``); these counts are the same on a
loaded machine. Needs a PostgreSQL server (``--pg-url``); it creates and drops its own
database.

    .venv/bin/python benchmarks/round_trips.py [--runs 100] [--pg-url postgresql://...]
    .venv/bin/python benchmarks/round_trips.py --bulk 2000 [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import uuid
from collections import Counter
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.pool import Pool

from treadle import Engine, WorkflowBuilder, WorkflowContext, define_stage, workflow

WARMUP = 5


class Payload(BaseModel):
    n: int


@define_stage(id="a", input=Payload, output=Payload)
async def stage_a(ctx: Any) -> Payload:
    return Payload(n=ctx.input.n)


@define_stage(id="b", input=Payload, output=Payload)
async def stage_b(ctx: Any) -> Payload:
    return Payload(n=ctx.input.n)


DRAINED: list[Any] = []  # [remaining, event] while a bulk drain counts its last stages


@define_stage(id="c", input=Payload, output=Payload)
async def stage_c(ctx: Any) -> Payload:
    if DRAINED:
        DRAINED[0] -= 1
        if DRAINED[0] == 0:
            DRAINED[1].set()
    return Payload(n=ctx.input.n)


PIPELINE = WorkflowBuilder("rt", input=Payload).pipe(stage_a).pipe(stage_b).pipe(stage_c).build()


async def noop(n: int) -> int:
    return n


@workflow(id="rt-code", input=Payload, output=Payload)
async def code_workflow(ctx: WorkflowContext, payload: Payload) -> Payload:
    """The pipeline's three stages as three steps of one code workflow."""
    n = await ctx.step("a", noop, payload.n)
    n = await ctx.step("b", noop, n)
    n = await ctx.step("c", noop, n)
    return Payload(n=n)


class Wire:
    """libpq traces of every pooled connection, into one file each."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.files: list[Any] = []
        event.listen(Pool, "connect", self._on_connect)

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        from psycopg import pq

        pgconn = dbapi_connection.driver_connection.pgconn
        trace = open(  # noqa: SIM115 - kept open while the connection lives
            os.path.join(self.directory, f"{len(self.files)}.trace"), "w"
        )
        self.files.append(trace)
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def count(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for trace in self.files:
            trace.flush()
            with open(trace.name) as fh:
                for line in fh:
                    parts = line.split("\t")
                    if len(parts) < 3:
                        continue
                    direction, message = parts[0], parts[2].split(" ")[0].strip()
                    if direction == "F" and message in ("Query", "Bind"):
                        counts["statements"] += 1
                        if message == "Query" and '"BEGIN' in line:
                            counts["begin"] += 1
                        if message == "Query" and '"COMMIT' in line:
                            counts["commit"] += 1
                    elif direction == "B" and message == "ReadyForQuery":
                        counts["round trips"] += 1
        return counts

    def close(self) -> None:
        event.remove(Pool, "connect", self._on_connect)
        for trace in self.files:
            trace.close()


async def _bulk(
    engine: Engine, wire: Wire, runs: int, concurrency: int
) -> tuple[Counter[str], Counter[str]]:
    """Start ``runs`` runs (uncounted), then count the worker's drain of them."""
    items = [{"workflow_id": "rt", "input": {"n": i}} for i in range(runs)]
    await engine.start_many(items, batch_size=100)
    done = asyncio.Event()
    DRAINED[:] = [runs, done]
    worker = engine.worker(
        concurrency=concurrency, orchestration_interval=1.0, job_poll_interval=0.05
    )
    before = wire.count()
    async with worker:
        await asyncio.wait_for(done.wait(), 600)
        while worker.in_flight:  # noqa: ASYNC110 - the Worker exposes a count, not an event
            await asyncio.sleep(0.001)
        after = wire.count()
    DRAINED.clear()
    return before, after


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--bulk", type=int, default=0, help="runs started, then drained")
    parser.add_argument("--concurrency", type=int, default=32, help="of the bulk drain")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--workflow", choices=("pipeline", "code"), default="pipeline")
    args = parser.parse_args()
    workflow_id = "rt" if args.workflow == "pipeline" else "rt-code"
    server = sa.make_url(args.pg_url)
    name = f"treadle_rt_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        server.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = server.set(drivername="postgresql+psycopg", database=name).render_as_string(
        hide_password=False
    )
    try:
        with tempfile.TemporaryDirectory() as directory:
            wire = Wire(directory)
            engine = await Engine.open(url, workflows=[PIPELINE, code_workflow], auto_migrate=True)
            try:
                if args.bulk:
                    before, after = await _bulk(engine, wire, args.bulk, args.concurrency)
                else:
                    async with engine.worker(concurrency=8):
                        for i in range(WARMUP):
                            await (await engine.start(workflow_id, {"n": -1 - i})).result(
                                timeout=30
                            )
                        before = wire.count()
                        for i in range(args.runs):
                            await (await engine.start(workflow_id, {"n": i})).result(timeout=30)
                        after = wire.count()
            finally:
                await engine.aclose()
                wire.close()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
    if args.bulk:
        stages = 3 * args.bulk
        print(
            f"{args.bulk} runs of a 3-stage no-op pipeline started with start_many, drained "
            f"at concurrency {args.concurrency}, PostgreSQL"
        )
        print("| per stage | count |\n|---|---|")
        for key in ("statements", "round trips", "begin", "commit"):
            print(f"| {key} | {(after[key] - before[key]) / stages:.3f} |")
        return
    stages = 3 * args.runs
    what = "3-stage no-op pipeline" if args.workflow == "pipeline" else "3-step no-op code workflow"
    unit = "stage" if args.workflow == "pipeline" else "step"
    print(f"{args.runs} runs of a {what}, one at a time, PostgreSQL")
    print(f"| per {unit} | count |\n|---|---|")
    for key in ("statements", "round trips", "begin", "commit"):
        print(f"| {key} | {(after[key] - before[key]) / stages:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
