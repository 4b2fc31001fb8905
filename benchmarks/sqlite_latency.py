"""SQLite, one run at a time: CPU, statements and event-loop wake-ups per stage, by driver.

The user's path of issue 11 on SQLite (a 3-stage no-op pipeline, or a 3-step code
workflow, ``engine.start`` then ``handle.result``, one run at a time, the in-process
worker) with each asyncio SQLite driver in turn, in one process:

* ``treadle``: ``sqlite:///`` URLs' default, statements run on the loop's thread
  (``adapters/sql/sqlite_driver.py``);
* ``aiosqlite``: ``sqlite+aiosqlite:///``, a thread per connection, every DBAPI call a
  hand-off to it.

Printed per stage (per step for the code workflow), over the measured runs:

* *CPU*: the process's CPU time (``time.process_time``, every thread), which a loaded
  machine inflates far less than wall time;
* *statements* and *commits*: what SQLAlchemy sent through a cursor
  (``before_cursor_execute``) and its commits; aiosqlite's ``BEGIN`` is one of those
  statements, the inline driver's is sent by its dialect and is not;
* *hops*: calls handed to aiosqlite's connection thread (its ``_execute``);
* *loop turns*: iterations of the event loop (each calls ``select``); *waits*: those
  that had nothing ready to run and slept in ``select`` until woken (each hop costs
  one: the thread's answer wakes the loop through its self-pipe).

CPU and latency are measured over ``--runs`` runs with nothing counting; the counts
over 30 more, with listeners and wrappers on. Wall-clock latency (p50) is printed too,
but only a quiet machine makes it meaningful (``versus_dbos.py --backends sqlite``
compares with DBOS): under contention a process that never sleeps (the inline driver's
loop has nothing to wait for) gets a smaller share of the CPU than one that sleeps
dozens of times per stage with two busy threads.

    .venv/bin/python benchmarks/sqlite_latency.py [--runs 200] [--workload pipeline|code|both]
        [--driver treadle|aiosqlite|both]

Instructions per stage, which load does not change: the difference of two process
totals under ``valgrind --tool=cachegrind --cache-sim=no`` (every thread counted),
``--runs 20`` and ``--runs 70`` with one ``--workload`` and one ``--driver``, divided by
150 stages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.engine import Engine as SyncEngine

from treadle import Engine, WorkflowBuilder, WorkflowContext, define_stage, workflow

WARMUP = 10
COUNTED = 30
"""Runs counted (statements, hops, loop turns), after the timed ones."""
DRIVERS = {"treadle": "sqlite", "aiosqlite": "sqlite+aiosqlite"}


class Payload(BaseModel):
    n: int


@define_stage(id="a", input=Payload, output=Payload)
async def stage_a(ctx: Any) -> Payload:
    return Payload(n=ctx.input.n)


@define_stage(id="b", input=Payload, output=Payload)
async def stage_b(ctx: Any) -> Payload:
    return Payload(n=ctx.input.n)


@define_stage(id="c", input=Payload, output=Payload)
async def stage_c(ctx: Any) -> Payload:
    return Payload(n=ctx.input.n)


PIPELINE = WorkflowBuilder("pipe", input=Payload).pipe(stage_a).pipe(stage_b).pipe(stage_c).build()


async def noop(n: int) -> int:
    return n


@workflow(id="code", input=Payload, output=Payload)
async def code(ctx: WorkflowContext, p: Payload) -> Payload:
    x = await ctx.step("s1", noop, p.n)
    x = await ctx.step("s2", noop, x)
    x = await ctx.step("s3", noop, x)
    return Payload(n=x)


class Counts:
    """Statements, commits, aiosqlite hops and loop wake-ups, counted while on."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.on = False
        self._unpatch: list[Any] = []

    def _statement(self, *args: Any) -> None:
        if self.on:
            self.counts["statements"] += 1

    def _commit(self, *args: Any) -> None:
        if self.on:
            self.counts["commits"] += 1

    def patch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count statements, commits, aiosqlite's hand-offs and the loop's selects
        (listeners and benchmark-only wrappers, removed by ``unpatch``: they cost CPU,
        and listeners make SQLAlchemy dispatch events around every statement)."""
        import aiosqlite.core

        event.listen(SyncEngine, "before_cursor_execute", self._statement)
        event.listen(SyncEngine, "commit", self._commit)

        original_execute = aiosqlite.core.Connection._execute

        async def execute(conn: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.counts["hops"] += 1
            return await original_execute(conn, fn, *args, **kwargs)

        aiosqlite.core.Connection._execute = execute  # type: ignore[method-assign]
        selector = loop._selector  # type: ignore[attr-defined]
        original_select = selector.select

        def select(timeout: float | None = None) -> Any:
            if self.on:
                self.counts["loop turns"] += 1
                if timeout is None or timeout > 0:
                    self.counts["waits"] += 1
            return original_select(timeout)

        selector.select = select
        self._unpatch = [
            lambda: setattr(aiosqlite.core.Connection, "_execute", original_execute),
            lambda: delattr(selector, "select"),
            lambda: event.remove(SyncEngine, "before_cursor_execute", self._statement),
            lambda: event.remove(SyncEngine, "commit", self._commit),
        ]

    def unpatch(self) -> None:
        for undo in self._unpatch:
            undo()
        self._unpatch = []


async def measure(driver: str, workflow_id: str, runs: int, counts: Counts) -> dict[str, float]:
    """CPU and latency over ``runs`` runs, nothing counting; then the counts over
    ``COUNTED`` more runs, with the counters on."""
    with tempfile.TemporaryDirectory() as directory:
        url = f"{DRIVERS[driver]}:///{os.path.join(directory, 'bench.db')}"
        engine = await Engine.open(url, workflows=[PIPELINE, code], auto_migrate=True)
        try:
            async with engine.worker(concurrency=8):
                for i in range(WARMUP):
                    await (await engine.start(workflow_id, {"n": -1 - i})).result(timeout=30)
                latencies = []
                cpu = time.process_time()
                for i in range(runs):
                    began = time.perf_counter()
                    await (await engine.start(workflow_id, {"n": i})).result(timeout=30)
                    latencies.append(time.perf_counter() - began)
                cpu = time.process_time() - cpu
                counts.counts.clear()
                counts.patch(asyncio.get_running_loop())
                counts.on = True
                try:
                    for i in range(COUNTED):
                        await (await engine.start(workflow_id, {"n": i})).result(timeout=30)
                finally:
                    counts.on = False
                    counts.unpatch()
        finally:
            await engine.aclose()
    stages = 3 * runs
    figures = {key: value / (3 * COUNTED) for key, value in counts.counts.items()}
    figures["cpu_ms"] = cpu / stages * 1000
    figures["cpu_run_ms"] = cpu / runs * 1000
    figures["p50_ms"] = statistics.median(latencies) * 1000
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workload", choices=("pipeline", "code", "both"), default="both")
    parser.add_argument("--driver", choices=(*DRIVERS, "both"), default="both")
    args = parser.parse_args()
    counts = Counts()
    workloads = ["pipe", "code"] if args.workload == "both" else [args.workload[:4]]
    print(f"{args.runs} runs one at a time, 3 stages (steps) each, SQLite, per stage:")
    print(
        "| workload | driver | CPU ms/stage | CPU ms/run | statements | commits | hops "
        "| loop turns | waits | p50 ms/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workflow_id in workloads:
        for driver in DRIVERS if args.driver == "both" else [args.driver]:
            f = await measure(driver, workflow_id, args.runs, counts)
            print(
                f"| {'pipeline' if workflow_id == 'pipe' else 'code'} | {driver} "
                f"| {f['cpu_ms']:.2f} | {f['cpu_run_ms']:.2f} "
                f"| {f.get('statements', 0):.2f} | {f.get('commits', 0):.2f} "
                f"| {f.get('hops', 0):.2f} | {f.get('loop turns', 0):.2f} "
                f"| {f.get('waits', 0):.2f} "
                f"| {f['p50_ms']:.2f} |"
            )


if __name__ == "__main__":
    asyncio.run(main())
