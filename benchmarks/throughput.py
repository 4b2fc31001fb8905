"""End-to-end throughput on SQLite and PostgreSQL (issue 3, requirement 9).

N runs of a 3-stage no-op pipeline, executed by one worker process (one ``Worker``
with K concurrent slots, the in-process worker of ``Engine.worker``). For each
backend it prints:

* burst throughput: all N runs are started first, then the worker drains them;
  stages/s and runs/s over the drain, and p50/p99 of each run's created-to-completed
  time (dominated by queueing in a burst);
* unloaded latency: runs started one at a time against an idle, waiting worker,
  p50/p99 of their stored created-to-completed time;
* PostgreSQL only: commits per stage, from ``pg_stat_database.xact_commit`` deltas of
  the benchmark's own fresh database over the drain (every committed transaction of
  the worker counts, reads and maintenance included; the worker's connections are
  closed before the second reading so their statistics are flushed, and the drain is
  detected in-process so the benchmark adds no queries of its own);
* PostgreSQL only: LISTEN/NOTIFY pickup latency, the median over ``--pickup-trials``
  of the time from a run committed by another engine (its own connection pool) to
  its stage body starting, with a worker that polls only every 30 s.

``--profile`` prints the top functions of a cProfile of the PostgreSQL drain (and writes
the raw statistics to ``$TREADLE_PROFILE_OUT`` if that is set).

    .venv/bin/python benchmarks/throughput.py [--runs 1000] [--concurrency 8]
        [--backend both|sqlite|postgres] [--pg-url postgresql://postgres@127.0.0.1:5432/test]
        [--profile] [--job-poll-interval 0.05] [--tracing off|sdk]

``--tracing sdk`` runs the worker's engine with ``telemetry=`` an OpenTelemetry SDK set-up
(batch span processor, an exporter that drops the spans, in-memory metric reader:
``_common.sdk_telemetry``); ``off`` (the default) passes none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from _common import (
    BackendCpu,
    Finished,
    count_sql,
    counting_pipeline,
    fresh_database,
    pct,
    sdk_telemetry,
    xact_commit,
)
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.adapters.sql import schema as t

STAGES = 3
PICKUP: dict[int, tuple[asyncio.Event, list[float]]] = {}


class Payload(BaseModel):
    n: int


DONE = Finished()
TELEMETRY: Any = lambda: None  # noqa: E731 - ``--tracing`` replaces it


def build_pipeline() -> Any:
    return counting_pipeline("noop-3", STAGES, DONE)


@define_stage(id="pickup", input=Payload, output=Payload)
async def pickup_stage(ctx):  # type: ignore[no-untyped-def]
    event, stamp = PICKUP[ctx.input.n]
    stamp.append(time.perf_counter())
    event.set()
    return ctx.input


PICKUP_WF = WorkflowBuilder("pickup-1", input=Payload).pipe(pickup_stage).build()


# -- databases ---------------------------------------------------------------------------
# -- phases ---------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def profiled(enabled: bool, top: int) -> AsyncIterator[None]:
    profiler = cProfile.Profile() if enabled else None
    if profiler is not None:
        profiler.enable()
    try:
        yield
    finally:
        if profiler is not None:
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
            print(out.getvalue())
            dump = os.environ.get("TREADLE_PROFILE_OUT")
            if dump:  # for pstats / snakeviz
                stats.dump_stats(dump)


async def _wait_for_all(worker: Any) -> None:
    """Until the last stage of every run has run and its commit finished (in-process:
    polling the database would add its own commits to the count)."""
    await DONE.event.wait()
    while worker.in_flight:  # noqa: ASYNC110 - the Worker exposes a count, not an event
        await asyncio.sleep(0.001)


async def _read_runs(url: str, run_ids: set[str] | None = None) -> list[Any]:
    engine = await Engine.open(url, workflows=[build_pipeline()])
    try:
        assert engine.backend is not None
        async with engine.backend.persistence.engine.connect() as conn:  # type: ignore[attr-defined]
            rows = (
                await conn.execute(
                    sa.select(
                        t.runs.c.id, t.runs.c.status, t.runs.c.created_at, t.runs.c.completed_at
                    )
                )
            ).all()
    finally:
        await engine.aclose()
    return [r for r in rows if run_ids is None or r.id in run_ids]


def count_commands(engine: Engine, counts: dict[str, int]) -> None:
    """Count the commands the worker dispatches, and its dequeues, by type."""
    kernel = engine.kernel
    dispatch = kernel.dispatch
    assert engine.backend is not None
    transport = engine.backend.job_transport
    dequeue = transport.dequeue

    async def counted_dispatch(cmd: Any, *args: Any, **kwargs: Any) -> Any:
        counts[cmd.type] = counts.get(cmd.type, 0) + 1
        return await dispatch(cmd, *args, **kwargs)

    async def counted_dequeue(*args: Any, **kwargs: Any) -> Any:
        jobs = await dequeue(*args, **kwargs)
        key = "dequeue (empty)" if not jobs else "dequeue"
        counts[key] = counts.get(key, 0) + 1
        return jobs

    kernel.dispatch = counted_dispatch  # type: ignore[method-assign]
    transport.dequeue = counted_dequeue  # type: ignore[method-assign]


async def burst(
    url: str,
    runs: int,
    concurrency: int,
    *,
    profile: bool,
    top: int,
    pg: bool,
    job_poll_interval: float = 0.05,
) -> dict[str, Any]:
    pipeline = build_pipeline()
    producer = await Engine.open(url, workflows=[pipeline], auto_migrate=True)
    try:
        t0 = time.perf_counter()
        run_ids = {(await producer.start("noop-3", {"n": i})).run_id for i in range(runs)}
        start_rate = runs / (time.perf_counter() - t0)
    finally:
        await producer.aclose()  # its server processes exit and flush their statistics
    engine = await Engine.open(url, workflows=[pipeline], telemetry=TELEMETRY())
    DONE.expect(runs)
    own_commits, statements = count_sql(engine)
    try:
        before = xact_commit(url) if pg else 0
        counts: dict[str, int] = {}
        count_commands(engine, counts)
        groups_before = engine.kernel.deps.commits.groups
        items_before = engine.kernel.deps.commits.items
        worker = engine.worker(
            concurrency=concurrency,
            orchestration_interval=1.0,
            job_poll_interval=job_poll_interval,
        )
        async with profiled(profile, top):
            started, cpu_started = time.perf_counter(), time.process_time()
            backends = BackendCpu(url) if pg else None
            if backends is not None:
                backends.start()
            async with worker:
                await _wait_for_all(worker)
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu_started
                server = backends.stop() if backends is not None else None
    finally:
        await engine.aclose()  # flushes the worker's statistics too
    DONE.target = -1
    # The first probe's own two autocommit statements are counted; the second's are not.
    commits = xact_commit(url) - before - 2 if pg else 0
    rows = await _read_runs(url, run_ids)
    failed = sum(1 for r in rows if r.status != "COMPLETED")
    if failed or len(rows) != runs:
        raise SystemExit(f"{failed} of {len(rows)} runs did not complete")
    latencies = [(r.completed_at - r.created_at).total_seconds() for r in rows]
    return {
        "start_rate": start_rate,
        "elapsed": elapsed,
        "stages_per_s": runs * STAGES / elapsed,
        "runs_per_s": runs / elapsed,
        "p50": pct(latencies, 0.5),
        "p99": pct(latencies, 0.99),
        "commits": float(commits),
        "worker_commits": float(own_commits[0]),
        "statements": float(statements[0]),
        "cpu": cpu,
        "server_cpu": server,
        "counts": counts,
        "groups": engine.kernel.deps.commits.groups - groups_before,
        "grouped": engine.kernel.deps.commits.items - items_before,
    }


async def unloaded_latency(url: str, samples: int, concurrency: int) -> dict[str, float]:
    """One run at a time against an idle worker; created_at to completed_at as stored."""
    pipeline = build_pipeline()
    engine = await Engine.open(url, workflows=[pipeline], auto_migrate=True)
    run_ids: set[str] = set()
    try:
        async with engine.worker(concurrency=concurrency, job_poll_interval=1.0):
            for i in range(samples):
                handle = await engine.start("noop-3", {"n": i})
                await handle.result(timeout=30)
                run_ids.add(handle.run_id)
    finally:
        await engine.aclose()
    rows = await _read_runs(url, run_ids)
    latencies = [(r.completed_at - r.created_at).total_seconds() for r in rows]
    return {"p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99)}


async def pickup_latency(url: str, trials: int) -> list[float]:
    worker_engine = await Engine.open(url, workflows=[PICKUP_WF], auto_migrate=True)
    client = await Engine.open(url, workflows=[PICKUP_WF])
    samples: list[float] = []
    try:
        listener: Any = worker_engine.backend.wake_source if worker_engine.backend else None
        async with worker_engine.worker(
            concurrency=2, job_poll_interval=30.0, orchestration_interval=30.0
        ):
            await listener.wait_listening()
            for n in range(trials):
                event: asyncio.Event = asyncio.Event()
                stamp: list[float] = []
                PICKUP[n] = (event, stamp)
                await client.start("pickup-1", {"n": n})
                committed = time.perf_counter()
                await asyncio.wait_for(event.wait(), 10)
                samples.append(stamp[0] - committed)
    finally:
        await client.aclose()
        await worker_engine.aclose()
    return samples


def report(name: str, runs: int, concurrency: int, b: dict[str, Any], u: dict[str, float]) -> None:
    print(f"== {name}: {runs} runs x {STAGES} no-op stages, 1 process, concurrency {concurrency}")
    print(f"   start (run.create) rate:     {b['start_rate']:8.0f} runs/s")
    print(f"   drain:                       {b['elapsed']:8.2f} s")
    print(f"   stages/s:                    {b['stages_per_s']:8.0f}")
    print(f"   runs/s:                      {b['runs_per_s']:8.0f}")
    print(
        f"   burst latency created->done: p50 {b['p50'] * 1000:7.0f} ms  "
        f"p99 {b['p99'] * 1000:7.0f} ms"
    )
    print(
        f"   unloaded latency created->done: p50 {u['p50'] * 1000:5.1f} ms  "
        f"p99 {u['p99'] * 1000:5.1f} ms"
    )


async def run_backend(name: str, url: str, args: argparse.Namespace) -> None:
    pg = name == "postgres"
    b = await burst(
        url,
        args.runs,
        args.concurrency,
        profile=args.profile and pg,
        top=args.top,
        pg=pg,
        job_poll_interval=args.job_poll_interval,
    )
    u = await unloaded_latency(url, args.latency_samples, args.concurrency)
    report(name, args.runs, args.concurrency, b, u)
    stages = args.runs * STAGES
    print(
        f"   worker transactions / stage: {b['worker_commits'] / stages:8.2f} "
        "(COMMITs the worker's engine issued)"
    )
    print(
        f"   worker CPU / stage:          {b['cpu'] / stages * 1000:8.2f} ms "
        "(user + system time of this process over the drain; less noisy than wall time)"
    )
    if b.get("server_cpu") is not None:
        print(
            f"   server CPU / stage:          {b['server_cpu'] / stages * 1000:8.2f} ms "
            "(the backends of the benchmark's database over the drain, from /proc)"
        )
    if b["groups"]:
        print(
            f"   group commits:               {b['groups']:8d} "
            f"(of {b['grouped'] / b['groups']:.1f} stage commits on average)"
        )
    print(
        f"   worker statements / stage:   {b['statements'] / stages:8.2f} "
        "(round trips besides BEGIN/COMMIT; an executemany counts once)"
    )
    print(
        "   worker calls / run:           "
        + ", ".join(f"{k} {v / args.runs:.2f}" for k, v in sorted(b["counts"].items()))
    )
    if pg:
        print(f"   xact_commit delta over drain: {b['commits']:7.0f}")
        print(
            f"   server commits per stage:    {b['commits'] / stages:8.2f} "
            "(pg_stat_database; includes the listener backend's NOTIFY processing)"
        )
        samples = await pickup_latency(url, args.pickup_trials)
        print(
            f"   LISTEN/NOTIFY pickup ({len(samples)} trials, worker polling every 30 s): "
            f"median {statistics.median(samples) * 1000:.1f} ms, "
            f"max {max(samples) * 1000:.1f} ms"
        )


async def amain(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()} cpus={os.cpu_count()} "
        f"python={platform.python_version()} sqlalchemy={sa.__version__} "
        f"tracing={args.tracing}"
    )
    for name in ("sqlite", "postgres"):
        if args.backend in ("both", name):
            with fresh_database(name, args.pg_url) as url:
                await run_backend(name, url, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backend", choices=["both", "sqlite", "postgres"], default="both")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--pickup-trials", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--job-poll-interval", type=float, default=0.05, help="the burst worker's, in seconds"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tracing", choices=["off", "sdk"], default="off")
    args = parser.parse_args()
    if args.tracing == "sdk":
        global TELEMETRY
        TELEMETRY = sdk_telemetry
    asyncio.run(amain(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
