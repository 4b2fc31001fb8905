"""Code-workflow throughput on SQLite and PostgreSQL (issue 5, requirement 12).

A 3-step code workflow whose steps do nothing, run by one in-process ``Worker`` (the
worker of ``Engine.worker``). Two phases per backend, each on a fresh database:

* sequential: one workflow at a time, started by the worker's own engine (the start
  wakes the worker at once) and awaited before the next starts; the figures include
  each ``run.create``;
* concurrent: N workflows are started first by another engine, then one worker with K
  concurrent slots drains them; the figures cover the drain only.

For each phase it prints workflows/s, steps/s and commits per step: the COMMITs the
measuring engine issued (a SQLAlchemy ``commit`` listener, as in ``throughput.py``; read
transactions count too) and, on PostgreSQL, the ``pg_stat_database.xact_commit`` delta
of the benchmark's own database (every committed transaction of the server, the
listener's NOTIFY processing included; the engine is closed before the second reading
so its statistics are flushed). Completion is detected in-process (the last step sets
an event), so the benchmark adds no queries of its own.

    .venv/bin/python benchmarks/code_workflows.py [--runs 500] [--concurrency 8]
        [--backend both|sqlite|postgres] [--pg-url postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import sys
import time
from typing import Any

import sqlalchemy as sa
from _common import count_sql, fresh_database, pg_version, xact_commit
from pydantic import BaseModel

from treadle import Engine, WorkflowContext, workflow
from treadle.adapters.sql import schema as t

STEPS = 3
DONE: dict[str, Any] = {"count": 0, "target": -1, "event": None}


class Payload(BaseModel):
    n: int


async def noop(n: int) -> int:
    return n


async def last(n: int) -> int:
    if DONE["target"] > 0:
        DONE["count"] += 1
        if DONE["count"] >= DONE["target"]:
            DONE["event"].set()
    return n


@workflow(id="three-noop-steps", input=Payload, output=int)
async def three_steps(ctx: WorkflowContext, payload: Payload) -> int:
    a: int = await ctx.step("first", noop, payload.n)
    b: int = await ctx.step("second", noop, a)
    c: int = await ctx.step("third", last, b)
    return c


# -- measuring ----------------------------------------------------------------------------
def _expect(target: int) -> asyncio.Event:
    event = asyncio.Event()
    DONE.update(count=0, target=target, event=event)
    return event


async def _settled(worker: Any) -> None:
    """Until the activation whose last step fired the event has committed its end."""
    while worker.in_flight:  # noqa: ASYNC110 - the Worker exposes a count, not an event
        await asyncio.sleep(0.001)


async def _check_completed(url: str, runs: int) -> None:
    engine = await Engine.open(url, workflows=[three_steps])
    try:
        assert engine.backend is not None
        async with engine.backend.persistence.engine.connect() as conn:  # type: ignore[attr-defined]
            rows = (await conn.execute(sa.select(t.runs.c.status))).all()
    finally:
        await engine.aclose()
    done = sum(1 for r in rows if r.status == "COMPLETED")
    if done != runs or len(rows) != runs:
        raise SystemExit(f"only {done} of {len(rows)} runs completed (expected {runs})")


async def sequential(url: str, runs: int, concurrency: int, pg: bool) -> dict[str, float]:
    engine = await Engine.open(url, workflows=[three_steps], auto_migrate=True)
    commits, _ = count_sql(engine)
    before = xact_commit(url) if pg else 0
    try:
        # Each start wakes the worker (notify), so it need not poll for work meanwhile.
        worker = engine.worker(
            concurrency=concurrency, orchestration_interval=1.0, job_poll_interval=1.0
        )
        async with worker:
            commits[0] = 0
            started = time.perf_counter()
            for i in range(runs):
                event = _expect(1)
                await engine.start("three-noop-steps", {"n": i})
                await event.wait()
                await _settled(worker)
            elapsed = time.perf_counter() - started
            own = commits[0]
    finally:
        await engine.aclose()
    DONE["target"] = -1
    server = xact_commit(url) - before - 2 if pg else 0  # minus the first probe's own two
    await _check_completed(url, runs)
    return {"elapsed": elapsed, "engine_commits": float(own), "server_commits": float(server)}


async def concurrent(url: str, runs: int, concurrency: int, pg: bool) -> dict[str, float]:
    producer = await Engine.open(url, workflows=[three_steps], auto_migrate=True)
    try:
        for i in range(runs):
            await producer.start("three-noop-steps", {"n": i})
    finally:
        await producer.aclose()  # its server processes exit and flush their statistics
    engine = await Engine.open(url, workflows=[three_steps])
    commits, _ = count_sql(engine)
    event = _expect(runs)
    try:
        before = xact_commit(url) if pg else 0
        worker = engine.worker(
            concurrency=concurrency, orchestration_interval=1.0, job_poll_interval=0.05
        )
        started = time.perf_counter()
        async with worker:
            await event.wait()
            await _settled(worker)
            elapsed = time.perf_counter() - started
            own = commits[0]
    finally:
        await engine.aclose()
    DONE["target"] = -1
    server = xact_commit(url) - before - 2 if pg else 0
    await _check_completed(url, runs)
    return {"elapsed": elapsed, "engine_commits": float(own), "server_commits": float(server)}


def report(phase: str, runs: int, figures: dict[str, float], pg: bool) -> None:
    steps = runs * STEPS
    elapsed = figures["elapsed"]
    print(f"   {phase}")
    print(f"      elapsed:                  {elapsed:8.2f} s")
    print(f"      workflows/s:              {runs / elapsed:8.1f}")
    print(f"      steps/s:                  {steps / elapsed:8.1f}")
    print(
        f"      engine commits / step:    {figures['engine_commits'] / steps:8.2f} "
        f"({figures['engine_commits']:.0f} COMMITs of the measuring engine)"
    )
    if pg:
        print(
            f"      server commits / step:    {figures['server_commits'] / steps:8.2f} "
            f"(xact_commit delta {figures['server_commits']:.0f})"
        )


async def run_backend(name: str, args: argparse.Namespace) -> None:
    pg = name == "postgres"
    print(
        f"== {name}: {STEPS}-step no-op code workflow, 1 process, "
        f"worker concurrency {args.concurrency}"
    )
    with fresh_database(name, args.pg_url) as url:
        if pg:
            print(f"   server: PostgreSQL {pg_version(url)}")
        seq = await sequential(url, args.runs, args.concurrency, pg)
    report(f"sequential ({args.runs} workflows, one at a time, start included)", args.runs, seq, pg)
    with fresh_database(name, args.pg_url) as url:
        con = await concurrent(url, args.runs, args.concurrency, pg)
    report(
        f"concurrent ({args.runs} started first, drained at concurrency {args.concurrency})",
        args.runs,
        con,
        pg,
    )


async def amain(args: argparse.Namespace) -> None:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"machine: {platform.machine()} cpus={os.cpu_count()} load average={load} "
        f"python={platform.python_version()} sqlalchemy={sa.__version__} "
        f"sqlite={sqlite3.sqlite_version}"
    )
    for name in ("sqlite", "postgres"):
        if args.backend in ("both", name):
            await run_backend(name, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backend", choices=["both", "sqlite", "postgres"], default="both")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    asyncio.run(amain(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
