"""Due-time precision (issue 11): how late timed work starts, with default Worker settings.

Four kinds of work fall due at a time rather than on an event:

* ``batch``: a batch stage's completion check, ``poll_interval`` after the body returned
  ``Suspend``; due at the ``stage:suspended`` event's ``next_poll_at``, started when the
  check function is entered;
* ``sleep``: a code workflow's ``ctx.sleep``; due at the timer's ``fire_at``, started
  when the body runs past the sleep;
* ``retry``: a stage's second attempt after ``RetryPolicy(initial_delay=...)``; due at
  the ``stage:failed`` event's ``retry_at``, started when the body is entered again;
* ``scheduled``: a ``run.create`` command held by the Scheduler port; due at its
  ``run_at``, started when the kernel dispatches it (the run's ``created_at``); the
  line below it times the run's stage body, claimed after the dispatch.

lateness = started - due, with the real clock, p50/p99/max over ``--samples`` samples,
taken one at a time so each one's due time is known to the worker only through the path
measured. Each kind is measured twice:

* ``local``: the due time is created in the worker's own engine (its own execution of
  the stage, or its own ``scheduler.schedule``);
* ``remote``: it is created by a second ``Engine.open`` on the same database, with its
  own connection pool and listener, as another process would be: that engine leases
  the run's first stage to itself (``run.create`` with ``claim_for``) and executes it
  (``execute_job``), or calls its own Scheduler, and runs no worker of its own.

The worker is ``engine.worker()`` with its defaults (``orchestration_interval`` 10 s,
``job_poll_interval`` 1 s, concurrency 8). Last, ``idle-to-claim``: a run started by
the second engine, to its stage body starting in the idle worker, timed from ``start``
returning (the commit is done) and from ``start`` being called.

SQLite has no NOTIFY: a due time created by another process is found at the worker's next
tick there, so only ``local`` is measured on SQLite.

On PostgreSQL each line also counts, on the wire of the worker's engine (its pooled
connections; not the LISTEN connection, not the second engine), what it sent from the
sample's start to the work starting: round trips (statements, plus ``BEGIN`` and
``COMMIT`` sent as their own requests), statements, and transactions (a ``BEGIN``, or a
statement sent alone in autocommit). For ``remote`` samples that is the worker's whole
share: the wake-up, the claim or the timer's firing, up to the body; unlike the times,
these counts do not depend on the machine's load. The median per sample is printed.

    .venv/bin/python benchmarks/due_precision.py [--samples 20] [--due 0.3]
        [--backend both|postgres|sqlite] [--kinds batch,sleep,retry,scheduled,claim]
        [--origins local,remote] [--pg-url postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from _common import fresh_database, pct, pg_version
from pydantic import BaseModel

from treadle import (
    Engine,
    Ready,
    RetryPolicy,
    StageContext,
    Suspend,
    WorkflowBuilder,
    WorkflowContext,
    define_batch_stage,
    define_stage,
    workflow,
)
from treadle.kernel import commands as c
from treadle.kernel.events import StageFailed, StageSuspended, TimerFired
from treadle.runtime.jobs import execute_job

KINDS = ("batch", "sleep", "retry", "scheduled", "claim")
ORIGINS = ("local", "remote")
TIMEOUT = 15.0
"""Seconds a sample may take before it counts as lost (the tick is 10 s)."""
ORIGIN_WORKER = "due-bench-origin"
"""The worker id the second engine leases its runs' first stages to."""

SETTLE = 0.05
"""Seconds between samples, so one sample's tail is not counted in the next."""

DUE = {"seconds": 0.3}
"""Seconds from creating the timed work to its due time (``--due``)."""


class N(BaseModel):
    n: int


class Sample:
    """Where one sample's start is recorded: wall-clock time (compared with due times)
    and the performance counter (compared with the caller's)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.wall = 0.0
        self.perf = 0.0
        wire = WIRE.get("worker")
        self.wire_from = wire.snapshot() if wire is not None else None
        self.wire: tuple[int, ...] | None = None
        """What the worker sent from the sample's start to the hit (``Wire.snapshot``)."""

    def hit(self) -> None:
        if not self.event.is_set():
            self.wall, self.perf = time.time(), time.perf_counter()
            wire = WIRE.get("worker")
            if wire is not None and self.wire_from is not None:
                now = wire.snapshot()
                self.wire = tuple(b - a for a, b in zip(self.wire_from, now, strict=True))
            self.event.set()


SAMPLES: dict[int, Sample] = {}


class Wire:
    """What the worker engine's pooled connections sent (PostgreSQL, psycopg): counted
    from SQLAlchemy's events and the driver's transaction status, so a ``BEGIN`` or
    ``COMMIT`` psycopg sends by itself is counted, and one it leaves out (a statement
    sent in autocommit, a commit of a connection that never began) is not."""

    def __init__(self) -> None:
        self.statements = self.begins = self.commits = self.alone = 0

    def attach(self, engine: Any) -> None:
        sync_engine = engine.backend.persistence.engine.sync_engine
        sa.event.listen(sync_engine, "before_cursor_execute", self._on_execute)
        sa.event.listen(sync_engine, "commit", self._on_end)
        sa.event.listen(sync_engine, "rollback", self._on_end)

    @staticmethod
    def _driver(conn: Any) -> Any:
        return conn.connection.driver_connection

    def _on_execute(self, conn: Any, *args: Any) -> None:
        from psycopg.pq import TransactionStatus

        driver = self._driver(conn)
        self.statements += 1
        if driver.autocommit:
            self.alone += 1
        elif driver.info.transaction_status == TransactionStatus.IDLE:
            self.begins += 1

    def _on_end(self, conn: Any) -> None:
        from psycopg.pq import TransactionStatus

        driver = self._driver(conn)
        if not driver.autocommit and driver.info.transaction_status != TransactionStatus.IDLE:
            self.commits += 1

    def snapshot(self) -> tuple[int, int, int]:
        """(round trips, statements, transactions) so far."""
        return (
            self.statements + self.begins + self.commits,
            self.statements,
            self.begins + self.alone,
        )


WIRE: dict[str, Wire] = {}
"""The worker engine's counter, while a PostgreSQL scenario runs (key ``worker``)."""
LAST_WIRE: list[tuple[int, ...] | None] = [None]
"""The last sample's ``Sample.wire``."""


def _hit(n: int) -> None:
    sample = SAMPLES.get(n)
    if sample is not None:
        sample.hit()


# -- the workloads ----------------------------------------------------------------------
@define_batch_stage(id="batch", input=N, output=N)
async def batch(ctx: StageContext[N, None]) -> Any:
    return Suspend(state={"n": ctx.input.n}, poll_interval=timedelta(seconds=DUE["seconds"]))


@batch.check_completion
async def batch_check(state: Any, ctx: Any) -> Any:
    _hit(state["n"])
    return Ready(output={"n": state["n"]})


@workflow(id="sleeper", input=N, output=N)
async def sleeper(ctx: WorkflowContext, req: N) -> N:
    await ctx.sleep(timedelta(seconds=DUE["seconds"]))
    _hit(req.n)
    return req


def _flaky() -> Any:
    @define_stage(
        id="flaky",
        input=N,
        output=N,
        retry=RetryPolicy(max_attempts=2, initial_delay=DUE["seconds"], backoff=1.0, jitter=0.0),
    )
    async def flaky(ctx: StageContext[N, None]) -> N:
        if ctx.attempt == 1:
            raise ConnectionError("the first attempt fails")
        _hit(ctx.input.n)
        return ctx.input

    return flaky


@define_stage(id="mark", input=N, output=N)
async def mark(ctx: StageContext[N, None]) -> N:
    _hit(ctx.input.n)
    return ctx.input


def workflows() -> list[Any]:
    """Built after ``--due`` is read: the retry policy's delay is fixed at definition."""
    return [
        WorkflowBuilder("batch", input=N).pipe(batch).build(),
        sleeper,
        WorkflowBuilder("flaky", input=N).pipe(_flaky()).build(),
        WorkflowBuilder("mark", input=N).pipe(mark).build(),
    ]


# -- creating timed work -------------------------------------------------------------------
async def _events(engine: Engine, run_id: str) -> list[Any]:
    async with engine.kernel.deps.persistence.transaction(read_only=True) as tx:
        return list(await tx.outbox.events_for_run(run_id))


async def _start_remote(origin: Engine, workflow_id: str, n: int) -> str:
    """Create the run and execute its first stage in ``origin``, as another process
    would: the stage is leased to ``origin`` in the start's own commit, so the worker
    under test never sees it until the due time the execution commits."""
    result = await origin.kernel.dispatch(
        c.RunCreate(workflow_id=workflow_id, input={"n": n}, claim_for=ORIGIN_WORKER)
    )
    job = result.chained_job
    assert job is not None, "run.create with claim_for leased no job"
    await execute_job(origin.kernel, job, worker_id=ORIGIN_WORKER)
    return result.workflow_run_id


async def _due_of(engine: Engine, kind: str, run_id: str) -> datetime:
    for event in await _events(engine, run_id):
        if kind == "batch" and isinstance(event, StageSuspended):
            return event.next_poll_at
        if kind == "retry" and isinstance(event, StageFailed) and event.retry_at is not None:
            return event.retry_at
        if kind == "sleep" and isinstance(event, TimerFired):
            return event.fire_at
    raise RuntimeError(f"no due time in the events of {kind} run {run_id}")


WORKFLOW_OF = {"batch": "batch", "sleep": "sleeper", "retry": "flaky"}


async def one_sample(
    kind: str, worker_engine: Engine, origin: Engine, n: int
) -> tuple[float, float | None]:
    """Create one piece of timed work through ``origin``; its lateness (s), and for a
    scheduled command the lateness of the body of the run it created."""
    sample = SAMPLES[n] = Sample()
    local = origin is worker_engine
    try:
        if kind == "scheduled":
            run_id = uuid.uuid4().hex
            due = datetime.now(UTC) + timedelta(seconds=DUE["seconds"])
            command = {"type": "run.create", "workflow_id": "mark", "input": {"n": n}}
            await origin.kernel.deps.scheduler.schedule(
                f"due-bench-{n}", {**command, "run_id": run_id}, due
            )
            await asyncio.wait_for(sample.event.wait(), TIMEOUT)
            LAST_WIRE[:] = [sample.wire]
            run = await worker_engine.get_run(run_id, with_stages=False)
            return (run.created_at - due).total_seconds(), sample.wall - due.timestamp()
        workflow_id = WORKFLOW_OF[kind]
        if local:
            run_id = (await worker_engine.start(workflow_id, {"n": n})).run_id
        else:
            run_id = await _start_remote(origin, workflow_id, n)
        await asyncio.wait_for(sample.event.wait(), TIMEOUT)
        LAST_WIRE[:] = [sample.wire]
        due = await _due_of(worker_engine, kind, run_id)
        return sample.wall - due.timestamp(), None
    finally:
        SAMPLES.pop(n, None)


async def claim_sample(origin: Engine, n: int) -> tuple[float, float]:
    """Seconds from ``start`` returning, and from ``start`` called, to the body."""
    sample = SAMPLES[n] = Sample()
    try:
        called = time.perf_counter()
        await origin.start("mark", {"n": n})
        returned = time.perf_counter()
        await asyncio.wait_for(sample.event.wait(), TIMEOUT)
        LAST_WIRE[:] = [sample.wire]
        return sample.perf - returned, sample.perf - called
    finally:
        SAMPLES.pop(n, None)


# -- scenarios -----------------------------------------------------------------------------
class Figures(BaseModel):
    name: str
    samples: list[float]
    lost: int = 0
    extra: list[float] = []
    """A second figure per sample: from ``start`` called (idle-to-claim), the body of
    the created run (scheduled)."""
    extra_label: str = ""
    wire: list[tuple[int, ...]] = []
    """Per sample: the worker's round trips, statements and transactions (PostgreSQL)."""


async def scenario(url: str, kind: str, origin_kind: str, samples: int, warmup: int) -> Figures:
    defs = workflows()
    worker_engine = await Engine.open(url, workflows=defs, auto_migrate=True)
    origin = worker_engine if origin_kind == "local" else await Engine.open(url, workflows=defs)
    values: list[float] = []
    extra: list[float] = []
    wires: list[tuple[int, ...]] = []
    lost = 0
    if url.startswith("postgresql"):
        WIRE["worker"] = Wire()
        WIRE["worker"].attach(worker_engine)
    try:
        async with worker_engine.worker():
            backend = worker_engine.backend
            listener: Any = backend.wake_source if backend is not None else None
            if listener is not None:
                await listener.wait_listening()
            for n in range(warmup + samples):
                second: float | None
                # The previous sample's tail (its stage's commit, a freed slot's dequeue)
                # is not this sample's: let it finish before the next one starts.
                await asyncio.sleep(SETTLE)
                try:
                    if kind == "claim":
                        value, second = await claim_sample(origin, n)
                    else:
                        value, second = await one_sample(kind, worker_engine, origin, n)
                except TimeoutError:
                    lost += 1
                    continue
                if n >= warmup:
                    values.append(value)
                    if second is not None:
                        extra.append(second)
                    if LAST_WIRE[0] is not None:
                        wires.append(LAST_WIRE[0])
    finally:
        WIRE.pop("worker", None)
        if origin is not worker_engine:
            await origin.aclose()
        await worker_engine.aclose()
    label = {"claim": "from start called", "scheduled": "its run's body"}.get(kind, "")
    return Figures(
        name=f"{kind} ({origin_kind})",
        samples=values,
        lost=lost,
        extra=extra,
        extra_label=label,
        wire=wires,
    )


def _ms(value: float) -> str:
    return f"{value * 1000:8.1f}"


def report(figures: Figures) -> None:
    v = figures.samples
    if not v:
        print(f"   {figures.name:<22} no samples ({figures.lost} lost)")
        return
    lost = f"  ({figures.lost} lost past {TIMEOUT:g} s)" if figures.lost else ""
    print(
        f"   {figures.name:<22} p50 {_ms(pct(v, 0.5))}  p99 {_ms(pct(v, 0.99))}  "
        f"max {_ms(max(v))}  min {_ms(min(v))}  n={len(v)}{lost}"
    )
    if figures.extra:
        e = figures.extra
        print(
            f"   {'  ' + figures.extra_label:<22} p50 {_ms(pct(e, 0.5))}  p99 {_ms(pct(e, 0.99))}  "
            f"max {_ms(max(e))}  min {_ms(min(e))}"
        )
    if figures.wire:
        trips, statements, transactions = (
            pct([float(w[i]) for w in figures.wire], 0.5) for i in range(3)
        )
        print(
            f"   {'  worker, median':<22} {trips:g} round trips, {statements:g} statements, "
            f"{transactions:g} transactions"
        )


async def run_backend(
    backend: str, pg_url: str, kinds: list[str], origins: list[str], samples: int, warmup: int
) -> None:
    print(f"== {backend}: lateness in ms (started - due; idle-to-claim: body - start)")
    for kind in kinds:
        for origin_kind in origins:
            if backend == "sqlite" and origin_kind == "remote":
                continue  # no NOTIFY: another process's due times are found at the tick
            if kind == "claim" and origin_kind == "local":
                continue  # a local start hands the run to the worker in its own commit
            started = time.perf_counter()
            with fresh_database(backend, pg_url) as url:
                figures = await scenario(url, kind, origin_kind, samples, warmup)
            report(figures)
            print(f"   {'':<22} ({time.perf_counter() - started:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["both", "postgres", "sqlite"], default="both")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--due", type=float, default=0.3, help="seconds until due")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--origins", default=",".join(ORIGINS))
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("TREADLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    logging.getLogger("treadle").setLevel(logging.ERROR)  # the retries' failures log warnings
    DUE["seconds"] = args.due
    kinds = [k for k in args.kinds.split(",") if k]
    origins = [o for o in args.origins.split(",") if o]
    unknown = sorted({*kinds} - {*KINDS}) + sorted({*origins} - {*ORIGINS})
    if unknown:
        parser.error(f"unknown kinds or origins: {', '.join(unknown)}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(
        f"due_precision: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in load)}, "
        f"Python {platform.python_version()}, due in {args.due:g} s, "
        f"{args.samples} samples (+{args.warmup} warm-up) per scenario"
    )
    backends = ["postgres", "sqlite"] if args.backend == "both" else [args.backend]
    if "postgres" in backends:
        print(f"PostgreSQL {pg_version(args.pg_url)}")
    for backend in backends:
        asyncio.run(run_backend(backend, args.pg_url, kinds, origins, args.samples, args.warmup))


if __name__ == "__main__":
    main()
