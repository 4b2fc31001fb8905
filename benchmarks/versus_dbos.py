"""Treadle versus DBOS, side by side in one process (issue 11).

The same no-op work on both engines, on the same PostgreSQL server (one fresh database
per measurement, created and dropped here) and on SQLite (one fresh file each):

* Treadle: a 3-stage pipeline (``WorkflowBuilder``, three ``define_stage``) and a
  3-step code workflow (``@workflow``, three ``ctx.step``), opened with
  ``Engine.open(url, workflows=[...])`` and run by the in-process ``engine.worker``;
* DBOS: an ``@DBOS.workflow()`` of three ``@DBOS.step()`` calls, taken two ways:
  *start* (``DBOS.start_workflow_async``: the workflow is recorded, then runs at once in
  this process; ``handle.get_result()`` awaits its task) and *queue*
  (``Queue.enqueue_async`` on a ``DBOS.register_queue`` queue: recorded ENQUEUED,
  dequeued by the queue's polling thread, ``handle.get_result()`` polls the database).
  Treadle's ``engine.start`` is a durable queued start, so the *queue* column is the
  like-for-like one; *start* is what a DBOS user writes by default. DBOS polls its
  queue and a queued result every 1 s by default; here ``--dbos-queue-poll`` (0.05 s,
  the poll of ``throughput.py``'s Treadle worker) and ``--dbos-result-poll`` (0.01 s).

Scenarios (``--scenarios``; ``latency,commits,start,bulk`` by default):

* ``latency``: ``--runs`` runs one at a time, start then result, after a few unmeasured
  ones; p50 and p99 of the wall time from before the start call to the result in hand
  (*start->result*, which includes how each side waits for the result: Treadle polls
  storage with a backoff from 5 ms, DBOS *start* awaits its task, DBOS *queue* polls
  every ``--dbos-result-poll`` s), and of each run's stored creation to completion
  (*stored*: the engine's own share).
* ``commits`` (PostgreSQL only): the same one-at-a-time runs; the
  ``pg_stat_database.xact_commit`` delta of the engine's own database over a session
  (open, runs, close), minus that of the same session with no measured runs, per stage
  (per step for DBOS). Every transaction counts: the worker's, the result polling's, the
  queue polling's, the listener's.
* ``start``: ``--start-runs`` starts one by one with nothing executing them (Treadle:
  ``engine.start`` without a worker; DBOS: ``enqueue_async`` on a queue this process
  does not listen to), and DBOS ``start_workflow_async`` (whose workflows run at once,
  meanwhile). ``engine.start_many`` is measured where it exists.
* ``bulk``: ``--bulk`` runs started (Treadle's pipeline with ``engine.start_many``, the
  rest one by one as above), then drained by one process at
  concurrency ``--concurrency`` (Treadle: ``engine.worker`` polling every 50 ms as in
  ``throughput.py``; DBOS: the queue's ``worker_concurrency``, polling every
  ``--dbos-queue-poll`` s); stages (steps) per second over the drain. The drain is
  detected in-process (the last stage or step counts), then the last commits awaited.
  Per stage (step) also: the CPU time of this process over the drain (steadier than
  wall time on a shared machine), on PostgreSQL the CPU of the database's own backends
  (``_common.BackendCpu``) and its commits (``xact_commit`` over the drain's session).
* ``bulk-code`` (not in the default set: it takes about a minute of its own): the same
  for Treadle's 3-step code workflow.

It prints one Markdown table: the Treadle figure, the two DBOS figures and Treadle's
standing against each, with the machine's facts. Needs the ``bench`` extra
(``pip install -e '.[bench]'``); the package itself never imports DBOS.

    .venv/bin/python benchmarks/versus_dbos.py [--scenarios latency,commits,start,bulk[,bulk-code]]
        [--backends pg,sqlite] [--runs 200] [--start-runs 500] [--bulk 2000]
        [--concurrency 32] [--pg-url postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from _common import (
    BackendCpu,
    fresh_database,
    libpq_url,
    pct,
    pg_version,
    settled_xact_commit,
)
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, WorkflowContext, define_stage, workflow

try:
    from dbos import DBOS
except ImportError:  # pragma: no cover - the message is the point
    raise SystemExit("DBOS is not installed: .venv/bin/pip install -e '.[bench]'") from None

STAGES = 3
WARMUP = 5  # unmeasured runs first in every one-at-a-time session
QUEUE = "treadle-bench"
PIPELINE_ID, CODE_ID = "vs-pipeline", "vs-code"
TREADLE_LABELS = {PIPELINE_ID: "3-stage pipeline", CODE_ID: "3-step code workflow"}


class Finish:
    """Counts the last stage (step) of each run while armed, and says when ``target``
    are done. Thread-safe: DBOS runs dequeued workflows on its own event loop thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.count, self.target = 0, -1

    def arm(self, target: int) -> None:
        with self._lock:
            self.count, self.target = 0, target
            self._done.clear()

    def hit(self) -> None:
        with self._lock:
            if self.target < 0:
                return
            self.count += 1
            if self.count >= self.target:
                self._done.set()

    async def wait(self, within: float = 600.0) -> None:
        if not await asyncio.to_thread(self._done.wait, within):
            raise SystemExit(f"only {self.count} of {self.target} runs finished in {within}s")
        self.target = -1


FINISH = Finish()


# -- the workloads -------------------------------------------------------------------------
class Payload(BaseModel):
    n: int


def _stage(index: int) -> Any:
    @define_stage(id=f"s{index}", input=Payload, output=Payload)
    async def noop(ctx):  # type: ignore[no-untyped-def]
        if index == STAGES - 1:
            FINISH.hit()
        return ctx.input

    return noop


def _pipeline() -> Any:
    builder = WorkflowBuilder(PIPELINE_ID, input=Payload)
    for i in range(STAGES):
        builder = builder.pipe(_stage(i))
    return builder.build()


PIPELINE = _pipeline()


async def noop(n: int) -> int:
    return n


async def last(n: int) -> int:
    FINISH.hit()
    return n


@workflow(id=CODE_ID, input=Payload, output=int)
async def three_steps(ctx: WorkflowContext, payload: Payload) -> int:
    a: int = await ctx.step("first", noop, payload.n)
    b: int = await ctx.step("second", noop, a)
    c: int = await ctx.step("third", last, b)
    return c


@DBOS.step()
async def dbos_noop(n: int) -> int:
    return n


@DBOS.step()
async def dbos_last(n: int) -> int:
    FINISH.hit()
    return n


@DBOS.workflow()
async def dbos_three_steps(n: int) -> int:
    a = await dbos_noop(n)
    b = await dbos_noop(a)
    return await dbos_last(b)


# -- sessions ------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def treadle_session(url: str, **worker_options: Any) -> AsyncIterator[Engine]:
    """An engine on ``url`` with both workflows; with ``worker_options``, its in-process
    worker running too."""
    engine = await Engine.open(url, workflows=[PIPELINE, three_steps], auto_migrate=True)
    try:
        if worker_options:
            async with engine.worker(**worker_options):
                yield engine
        else:
            yield engine
    finally:
        await engine.aclose()


@contextlib.asynccontextmanager
async def dbos_session(
    url: str, args: argparse.Namespace, *, queue: str = "none"
) -> AsyncIterator[Any]:
    """DBOS launched on ``url`` (a process-wide singleton: one at a time, destroyed on
    exit). With ``queue`` "listen" or "enqueue" it registers the benchmark's queue and
    yields it, dequeued by this process only if "listen"; with "none", no queue (so no
    queue polling), and it yields ``None``."""
    DBOS(config={"name": "treadle-bench", "system_database_url": url, "log_level": "WARNING"})
    try:
        if queue == "enqueue":
            DBOS.listen_queues([])
        DBOS.launch()
        if queue == "none":
            yield None
        else:
            yield await DBOS.register_queue_async(
                QUEUE,
                worker_concurrency=args.concurrency,
                polling_interval_sec=args.dbos_queue_poll,
            )
    finally:
        DBOS.destroy()
        # DBOS installed its own default executor on this loop and shut it down.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor())


def dbos_url(url: str) -> str:
    return libpq_url(url) if url.startswith("postgresql") else url


# -- one run at a time ---------------------------------------------------------------------
class Sequential(NamedTuple):
    latencies: list[float]  # seconds from before the start call to the result in hand
    stored: list[float] | None  # seconds from stored creation to stored completion
    commits: float | None = None  # per stage, where counted


async def _timed(one: Callable[[int], Awaitable[Any]], runs: int) -> list[float]:
    for i in range(WARMUP):
        await one(-1 - i)
    latencies = []
    for i in range(runs):
        started = time.perf_counter()
        await one(i)
        latencies.append(time.perf_counter() - started)
    return latencies


async def one_at_a_time(kind: str, url: str, runs: int, args: argparse.Namespace) -> Sequential:
    """A session of ``runs`` runs of ``kind`` (a Treadle workflow id, ``dbos-start`` or
    ``dbos-queue``), each started and awaited before the next."""
    if kind in TREADLE_LABELS:
        async with treadle_session(url, concurrency=8) as engine:

            async def one(i: int) -> None:
                handle = await engine.start(kind, {"n": i})
                await handle.result(timeout=30)

            latencies = await _timed(one, runs)
            done = sorted((r.created_at, r.completed_at) for r in await engine.list(limit=10_000))
            stored = [(end - begin).total_seconds() for begin, end in done[len(done) - runs :]]
            return Sequential(latencies, stored)
    mode = "none" if kind == "dbos-start" else "listen"
    async with dbos_session(dbos_url(url), args, queue=mode) as queue:

        async def start(i: int) -> None:
            await (await DBOS.start_workflow_async(dbos_three_steps, i)).get_result()

        async def enqueue(i: int) -> None:
            handle = await queue.enqueue_async(dbos_three_steps, i)
            await handle.get_result(polling_interval_sec=args.dbos_result_poll)

        latencies = await _timed(start if kind == "dbos-start" else enqueue, runs)
        if url.startswith("sqlite"):  # DBOS stores whole seconds there
            return Sequential(latencies, None)
        statuses = await DBOS.list_workflows_async(load_input=False, load_output=False)
        ms = sorted((w.created_at, w.completed_at or w.updated_at) for w in statuses)
        stored = [(end - begin) / 1000 for begin, end in ms[len(ms) - runs :]]
        return Sequential(latencies, stored)


async def sequential(
    kind: str, backend: str, args: argparse.Namespace, *, commits: bool
) -> Sequential:
    """``--runs`` one-at-a-time runs on a fresh database; with ``commits``, also the
    server's commits per stage: (session with runs - session without) / stages, after
    a first session that creates the schema."""
    with fresh_database(backend, args.pg_url) as url:
        if not commits:
            return await one_at_a_time(kind, url, args.runs, args)
        await one_at_a_time(kind, url, 0, args)
        before = settled_xact_commit(url)
        await one_at_a_time(kind, url, 0, args)
        baseline = settled_xact_commit(url)
        measured = await one_at_a_time(kind, url, args.runs, args)
        after = settled_xact_commit(url)
    per_stage = ((after - baseline) - (baseline - before)) / (args.runs * STAGES)
    return measured._replace(commits=per_stage)


# -- starting and draining -----------------------------------------------------------------
async def start_treadle(url: str, workflow_id: str, n: int) -> float:
    """Runs/s of ``n`` ``engine.start`` calls one by one, no worker running."""
    async with treadle_session(url) as engine:
        started = time.perf_counter()
        for i in range(n):
            await engine.start(workflow_id, {"n": i})
        return n / (time.perf_counter() - started)


async def start_many_treadle(url: str, n: int) -> str:
    """``engine.start_many`` in batches of 100, where it exists."""
    async with treadle_session(url) as engine:
        started = time.perf_counter()
        items = [{"workflow_id": PIPELINE_ID, "input": {"n": i}} for i in range(n)]
        await engine.start_many(items, batch_size=100)
        return f"{n / (time.perf_counter() - started):,.0f}"


async def fill_treadle(url: str, workflow_id: str, n: int) -> None:
    """Start ``n`` runs for a bulk drain, nothing executing them: ``engine.start_many``
    in batches of 100 (one by one for a code workflow)."""
    if workflow_id != PIPELINE_ID:
        await start_treadle(url, workflow_id, n)
        return
    async with treadle_session(url) as engine:
        items = [{"workflow_id": workflow_id, "input": {"n": i}} for i in range(n)]
        await engine.start_many(items, batch_size=100)


async def enqueue_dbos(url: str, n: int, args: argparse.Namespace) -> float:
    """Workflows/s of ``n`` ``enqueue_async`` calls one by one, nothing dequeuing."""
    async with dbos_session(dbos_url(url), args, queue="enqueue") as queue:
        started = time.perf_counter()
        for i in range(n):
            await queue.enqueue_async(dbos_three_steps, i)
        return n / (time.perf_counter() - started)


async def start_dbos(url: str, n: int, args: argparse.Namespace) -> float:
    """Workflows/s of ``n`` ``start_workflow_async`` calls one by one (each workflow
    runs at once, in this process, while the next starts)."""
    async with dbos_session(dbos_url(url), args):
        started = time.perf_counter()
        handles = [await DBOS.start_workflow_async(dbos_three_steps, i) for i in range(n)]
        rate = n / (time.perf_counter() - started)
        await asyncio.gather(*(h.get_result() for h in handles))
    return rate


class Drain(NamedTuple):
    """A bulk drain's figures: stages (steps) per second, and per stage the drain
    process's CPU (``time.process_time``: every thread, so DBOS's queue thread too), the
    CPU of the PostgreSQL backends of the engine's database (``BackendCpu``; ``None`` on
    SQLite) and the database's commits (``xact_commit`` delta, sessions included)."""

    rate: float
    cpu: float
    server_cpu: float | None
    commits: float | None
    note: str = ""


def _settled(url: str) -> int | None:
    return settled_xact_commit(url) if url.startswith("postgresql") else None


async def drain_treadle(url: str, workflow_id: str, n: int, args: argparse.Namespace) -> Drain:
    """Stages/s of one worker draining the ``n`` runs already started on ``url``."""
    FINISH.arm(n)
    pg = url.startswith("postgresql")
    before = _settled(url)
    async with treadle_session(url) as engine:
        worker = engine.worker(
            concurrency=args.concurrency, orchestration_interval=1.0, job_poll_interval=0.05
        )
        backends = BackendCpu(url) if pg else None
        if backends is not None:
            backends.start()
        commits = engine.kernel.deps.commits
        groups, items = commits.groups, commits.items
        started, cpu_started = time.perf_counter(), time.process_time()
        async with worker:
            await FINISH.wait()
            while worker.in_flight:  # noqa: ASYNC110 - the Worker exposes a count, not an event
                await asyncio.sleep(0.001)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            server = backends.stop() if backends is not None else None
        groups, items = commits.groups - groups, commits.items - items
        counts = await engine.aggregate()
    if counts != {"COMPLETED": n}:
        raise SystemExit(f"Treadle {workflow_id}: {counts}, expected {n} COMPLETED")
    after = _settled(url)
    stages = n * STAGES
    return Drain(
        stages / elapsed,
        cpu / stages,
        server / stages if server is not None else None,
        (after - before) / stages if after is not None and before is not None else None,
        f"{groups} group commits of {items / max(groups, 1):.1f} stage commits",
    )


async def drain_dbos(url: str, n: int, args: argparse.Namespace) -> Drain:
    """Steps/s of this process's queue worker draining the ``n`` workflows already
    enqueued on ``url``, timed from the queue's registration (after launch)."""
    FINISH.arm(n)
    pg = url.startswith("postgresql")
    before = _settled(url)
    async with dbos_session(dbos_url(url), args, queue="listen"):
        backends = BackendCpu(url) if pg else None
        if backends is not None:
            backends.start()
        early = FINISH.count
        started, cpu_started = time.perf_counter(), time.process_time()
        await FINISH.wait()
        while await DBOS.list_workflows_async(  # noqa: ASYNC110 - DBOS has no drain event
            status=["PENDING", "ENQUEUED"], load_input=False, load_output=False, limit=1
        ):
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        server = backends.stop() if backends is not None else None
        done = await DBOS.list_workflows_async(
            status="SUCCESS", load_input=False, load_output=False
        )
    if early:
        print(f"   note: DBOS finished {early} workflows before the timer started", file=sys.stderr)
    if len(done) != n:
        raise SystemExit(f"DBOS: {len(done)} of {n} workflows succeeded")
    after = _settled(url)
    steps = n * STAGES
    return Drain(
        steps / elapsed,
        cpu / steps,
        server / steps if server is not None else None,
        (after - before) / steps if after is not None and before is not None else None,
    )


# -- the table -----------------------------------------------------------------------------
class Table:
    """Rows of (figure, backend, Treadle, DBOS start, DBOS queue), each DBOS figure
    followed by Treadle's standing against it."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(
        self,
        figure: str,
        backend: str,
        treadle_value: float | str,
        start: float | str | None,
        queue: float | str | None,
        *,
        higher_is_better: bool,
        unit: str = "{:,.1f}",
    ) -> None:
        def cell(value: float | str | None) -> str:
            if value is None:
                return "-"
            return value if isinstance(value, str) else unit.format(value)

        def standing(other: float | str | None) -> str:
            if not isinstance(other, float) or not isinstance(treadle_value, float):
                return "-"
            if min(other, treadle_value) <= 0:
                return "n/a"
            if other == treadle_value:
                return "equal"
            if higher_is_better:
                ratio, worse = other / treadle_value, treadle_value < other
            else:
                ratio, worse = treadle_value / other, treadle_value > other
            factor = ratio if ratio >= 1 else 1 / ratio
            return f"**{factor:.2f}x worse**" if worse else f"{factor:.2f}x better"

        self.rows.append(
            [
                figure,
                backend,
                cell(treadle_value),
                cell(start),
                standing(start),
                cell(queue),
                standing(queue),
            ]
        )

    def print(self) -> None:
        header = [
            "figure",
            "db",
            "Treadle",
            "DBOS start",
            "Treadle vs start",
            "DBOS queue",
            "Treadle vs queue",
        ]
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        print(line(header))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in self.rows:
            print(line(row))


# -- the run -------------------------------------------------------------------------------
def treadle_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" (modified)" if dirty else "")


def progress(message: str) -> None:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"[{time.strftime('%H:%M:%S')} load {load}] {message}", file=sys.stderr, flush=True)


def _ms(seconds: list[float] | None, q: float) -> float | str:
    return "n/a (whole s)" if seconds is None else pct(seconds, q) * 1000


async def run_backend(backend: str, args: argparse.Namespace, table: Table) -> None:
    db = "pg" if backend == "postgres" else "sqlite"
    scenarios = args.scenarios
    if "latency" in scenarios or ("commits" in scenarios and db == "pg"):
        commits = "commits" in scenarios and db == "pg"
        results: dict[str, Sequential] = {}
        for kind in (PIPELINE_ID, CODE_ID, "dbos-start", "dbos-queue"):
            began = time.perf_counter()
            results[kind] = await sequential(kind, backend, args, commits=commits)
            progress(f"{db} one at a time: {kind} {time.perf_counter() - began:.1f}s")
        start, queue = results["dbos-start"], results["dbos-queue"]
        for workflow_id, label in TREADLE_LABELS.items():
            mine = results[workflow_id]
            if "latency" in scenarios:
                for what, field in (("start->result", "latencies"), ("stored", "stored")):
                    for q in (0.5, 0.99):
                        ms = [_ms(getattr(r, field), q) for r in (mine, start, queue)]
                        table.add(
                            f"p{round(q * 100)} ms {what}, {label}",
                            db,
                            *ms,
                            higher_is_better=False,
                        )
            if commits:
                table.add(
                    f"commits per stage, one at a time, {label}",
                    db,
                    mine.commits,
                    start.commits,
                    queue.commits,
                    higher_is_better=False,
                    unit="{:.2f}",
                )
    if "start" in scenarios:
        began = time.perf_counter()
        n = args.start_runs
        with fresh_database(backend, args.pg_url) as url:
            mine = await start_treadle(url, PIPELINE_ID, n)
        with fresh_database(backend, args.pg_url) as url:
            many = await start_many_treadle(url, n)
        with fresh_database(backend, args.pg_url) as url:
            started = await start_dbos(url, n, args)
        with fresh_database(backend, args.pg_url) as url:
            enqueued = await enqueue_dbos(url, n, args)
        progress(f"{db} start: {time.perf_counter() - began:.1f}s")
        table.add(
            f"starts/s one by one ({n}; DBOS start runs them meanwhile)",
            db,
            mine,
            started,
            enqueued,
            higher_is_better=True,
            unit="{:,.0f}",
        )
        table.add("starts/s, engine.start_many", db, many, None, None, higher_is_better=True)
    bulk = [w for w, name in ((PIPELINE_ID, "bulk"), (CODE_ID, "bulk-code")) if name in scenarios]
    if bulk:
        n = args.bulk
        drains: dict[str, Drain] = {}
        for workflow_id in bulk:
            began = time.perf_counter()
            with fresh_database(backend, args.pg_url) as url:
                await fill_treadle(url, workflow_id, n)
                drains[workflow_id] = await drain_treadle(url, workflow_id, n, args)
            progress(
                f"{db} bulk: {workflow_id} {time.perf_counter() - began:.1f}s "
                f"({drains[workflow_id].note})"
            )
        began = time.perf_counter()
        with fresh_database(backend, args.pg_url) as url:
            await enqueue_dbos(url, n, args)
            theirs = await drain_dbos(url, n, args)
        progress(f"{db} bulk: dbos-queue {time.perf_counter() - began:.1f}s")
        for workflow_id in bulk:
            mine, label = drains[workflow_id], TREADLE_LABELS[workflow_id]
            table.add(
                f"bulk {n} runs, stages/s at concurrency {args.concurrency}, {label}",
                db,
                mine.rate,
                None,
                theirs.rate,
                higher_is_better=True,
                unit="{:,.0f}",
            )
            table.add(
                f"bulk: drain process CPU ms per stage, {label}",
                db,
                mine.cpu * 1000,
                None,
                theirs.cpu * 1000,
                higher_is_better=False,
                unit="{:.3f}",
            )
            if mine.server_cpu is not None and theirs.server_cpu is not None:
                table.add(
                    f"bulk: server CPU ms per stage (the database's backends), {label}",
                    db,
                    mine.server_cpu * 1000,
                    None,
                    theirs.server_cpu * 1000,
                    higher_is_better=False,
                    unit="{:.3f}",
                )
                table.add(
                    f"bulk: client + server CPU ms per stage, {label}",
                    db,
                    (mine.cpu + mine.server_cpu) * 1000,
                    None,
                    (theirs.cpu + theirs.server_cpu) * 1000,
                    higher_is_better=False,
                    unit="{:.3f}",
                )
            if mine.commits is not None and theirs.commits is not None:
                table.add(
                    f"bulk: server commits per stage (drain session), {label}",
                    db,
                    mine.commits,
                    None,
                    theirs.commits,
                    higher_is_better=False,
                    unit="{:.3f}",
                )


async def amain(args: argparse.Namespace) -> None:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    facts = [
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load} (start)",
        f"python: {platform.python_version()}",
        f"dbos: {importlib.metadata.version('dbos')}",
        f"treadle: {treadle_commit()}",
    ]
    if "pg" in args.backends:
        facts.append(f"postgresql: {pg_version(args.pg_url)} at {args.pg_url}")
    table = Table()
    try:
        for backend in ("postgres", "sqlite"):
            if ("pg" if backend == "postgres" else "sqlite") in args.backends:
                await run_backend(backend, args, table)
    finally:  # what was measured, even if a later scenario failed
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        facts.append(f"load average at the end: {load}")
        facts.append(
            f"runs: --runs {args.runs} (+{WARMUP} warm-up), --start-runs {args.start_runs}, "
            f"--bulk {args.bulk}, --concurrency {args.concurrency}, "
            f"DBOS queue poll {args.dbos_queue_poll}s, result poll {args.dbos_result_poll}s"
        )
        for fact in facts:
            print(f"- {fact}")
        print()
        table.print()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenarios", default="latency,commits,start,bulk")
    parser.add_argument("--backends", default="pg,sqlite")
    parser.add_argument("--runs", type=int, default=200, help="one-at-a-time runs per session")
    parser.add_argument("--start-runs", type=int, default=500)
    parser.add_argument("--bulk", type=int, default=2000, help="runs started, then drained")
    parser.add_argument("--concurrency", type=int, default=32, help="of the bulk drain")
    parser.add_argument("--dbos-queue-poll", type=float, default=0.05, help="seconds")
    parser.add_argument("--dbos-result-poll", type=float, default=0.01, help="seconds")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    args.scenarios = set(args.scenarios.split(","))
    args.backends = set(args.backends.split(","))
    unknown = (args.scenarios - {"latency", "commits", "start", "bulk", "bulk-code"}) | (
        args.backends - {"pg", "sqlite"}
    )
    if unknown:
        parser.error(f"unknown scenario or backend: {', '.join(sorted(unknown))}")
    logging.getLogger("dbos").setLevel(logging.WARNING)
    asyncio.run(amain(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
