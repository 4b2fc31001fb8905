"""Start throughput on SQLite and PostgreSQL (issue 11).

For each backend, on a fresh database (a 3-stage no-op pipeline):

* ``engine.start`` one by one, nothing executing the runs: runs/s, and per run the
  statements (round trips besides ``BEGIN``/``COMMIT``; an executemany counts once),
  the transactions and this process's CPU time; without and with an idempotency key;
* ``engine.start_many`` in batches of 100 and of 1,000 (``--many`` runs each, with an
  idempotency key per item): runs/s, statements and transactions per batch;
* bulk, end to end: ``--bulk`` runs started with ``start_many`` (batches of 1,000), then
  drained by one in-process worker at concurrency ``--concurrency``: stages/s over the
  drain, and over start and drain together. The drain is detected in-process (the last
  stage of each run counts), then the worker's last commits are awaited;
* PostgreSQL only, the floor under one-by-one starts: a raw psycopg loop of one-row
  ``INSERT`` + ``COMMIT`` on the same server (each commit waits for its WAL flush).

It prints the machine's load average before and after: on a shared machine the
figures move with it.

    .venv/bin/python benchmarks/start_throughput.py [--backend both|sqlite|postgres]
        [--starts 1000] [--many 10000] [--bulk 5000] [--concurrency 256]
        [--pg-url postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time

import sqlalchemy as sa
from _common import Finished, count_sql, counting_pipeline, fresh_database, pg_version

from treadle import Engine

STAGES = 3
WORKFLOW = "start-noop-3"
DONE = Finished()
PIPELINE = counting_pipeline(WORKFLOW, STAGES, DONE)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Meter:
    """Wall time, this process's CPU time, and the SQL engine's statements and commits
    over a block."""

    def __init__(self, engine: Engine) -> None:
        self.commits, self.statements = count_sql(engine)

    def __enter__(self) -> Meter:
        self.c0, self.s0 = self.commits[0], self.statements[0]
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        self.n_commits = self.commits[0] - self.c0
        self.n_statements = self.statements[0] - self.s0


async def one_by_one(url: str, n: int, *, keyed: bool) -> dict[str, float]:
    async with await Engine.open(url, workflows=[PIPELINE], auto_migrate=True) as engine:
        for i in range(20):  # warm: connections, prepared statements
            await engine.start(WORKFLOW, {"n": i})
        meter = Meter(engine)
        with meter:
            for i in range(n):
                key = f"one-{i}" if keyed else None
                await engine.start(WORKFLOW, {"n": i}, idempotency_key=key)
    return {
        "runs/s": n / meter.elapsed,
        "statements/run": meter.n_statements / n,
        "commits/run": meter.n_commits / n,
        "cpu/run ms": meter.cpu / n * 1000,
    }


async def many(url: str, n: int, batch: int) -> dict[str, float]:
    async with await Engine.open(url, workflows=[PIPELINE], auto_migrate=True) as engine:
        await engine.start_many([{"workflow_id": WORKFLOW, "input": {"n": 0}}])  # warm
        items = [
            {"workflow_id": WORKFLOW, "input": {"n": i}, "idempotency_key": f"many-{batch}-{i}"}
            for i in range(n)
        ]
        meter = Meter(engine)
        with meter:
            handles = await engine.start_many(items, batch_size=batch)
        assert len(handles) == n
    batches = -(-n // batch)
    return {
        "runs/s": n / meter.elapsed,
        "statements/batch": meter.n_statements / batches,
        "commits/batch": meter.n_commits / batches,
        "cpu/run ms": meter.cpu / n * 1000,
    }


async def bulk(url: str, n: int, concurrency: int) -> dict[str, float]:
    """``n`` runs started with ``start_many``, then drained by one worker."""
    async with await Engine.open(url, workflows=[PIPELINE], auto_migrate=True) as engine:
        began = time.perf_counter()
        await engine.start_many(
            [{"workflow_id": WORKFLOW, "input": {"n": i}} for i in range(n)], batch_size=1_000
        )
        started = time.perf_counter()
        DONE.expect(n)
        worker = engine.worker(
            concurrency=concurrency, orchestration_interval=1.0, job_poll_interval=0.05
        )
        cpu0 = time.process_time()
        async with worker:
            await DONE.event.wait()
            while worker.in_flight:  # noqa: ASYNC110 - the Worker exposes a count, not an event
                await asyncio.sleep(0.001)
            drained = time.perf_counter()
            cpu = time.process_time() - cpu0
        DONE.target = -1
        counts = await engine.aggregate()
    if counts != {"COMPLETED": n}:
        raise SystemExit(f"bulk: {counts}, expected {n} COMPLETED")
    return {
        "start_many runs/s": n / (started - began),
        "drain stages/s": n * STAGES / (drained - started),
        "end-to-end stages/s": n * STAGES / (drained - began),
        "worker cpu/stage ms": cpu / (n * STAGES) * 1000,
    }


async def commit_floor(url: str, n: int = 500) -> float:
    """Sequential one-row INSERT + COMMIT per second with raw psycopg: the durable-commit
    rate a one-by-one start cannot beat on this server."""
    import psycopg

    from treadle.adapters.sql import sync_url

    libpq = sync_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    async with await psycopg.AsyncConnection.connect(libpq) as conn:
        await conn.execute("CREATE TEMP TABLE floor_probe (v int)")
        await conn.commit()
        started = time.perf_counter()
        for i in range(n):
            await conn.execute("INSERT INTO floor_probe VALUES (%s)", (i,))
            await conn.commit()
        return n / (time.perf_counter() - started)


def show(title: str, figures: dict[str, float]) -> None:
    cells = ", ".join(f"{k} {v:,.2f}" if v < 100 else f"{k} {v:,.0f}" for k, v in figures.items())
    print(f"   {title:42s} {cells}", flush=True)


async def run_backend(name: str, args: argparse.Namespace) -> None:
    print(f"== {name} (load average {load()})", flush=True)
    if name == "postgres":
        with fresh_database(name, args.pg_url) as url:
            print(f"   server {pg_version(url)}")
            show("commit floor (raw INSERT + COMMIT)", {"commits/s": await commit_floor(url)})
    for keyed in (False, True):
        with fresh_database(name, args.pg_url) as url:
            label = "engine.start one by one" + (", keyed" if keyed else "")
            show(label, await one_by_one(url, args.starts, keyed=keyed))
    for batch in (100, 1_000):
        with fresh_database(name, args.pg_url) as url:
            show(
                f"engine.start_many, batches of {batch:,}, keyed", await many(url, args.many, batch)
            )
    with fresh_database(name, args.pg_url) as url:
        show(
            f"bulk: {args.bulk:,} runs, start_many + drain (K={args.concurrency})",
            await bulk(url, args.bulk, args.concurrency),
        )
    print(f"   (load average after: {load()})", flush=True)


async def amain(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()} cpus={os.cpu_count()} "
        f"python={platform.python_version()} sqlalchemy={sa.__version__} "
        f"starts={args.starts} many={args.many} bulk={args.bulk} K={args.concurrency}"
    )
    for name in ("postgres", "sqlite"):
        if args.backend in ("both", name):
            await run_backend(name, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["both", "sqlite", "postgres"], default="both")
    parser.add_argument("--starts", type=int, default=1_000, help="one-by-one starts")
    parser.add_argument("--many", type=int, default=10_000, help="runs per start_many figure")
    parser.add_argument("--bulk", type=int, default=5_000, help="runs started, then drained")
    parser.add_argument("--concurrency", type=int, default=256, help="of the bulk drain")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    asyncio.run(amain(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
