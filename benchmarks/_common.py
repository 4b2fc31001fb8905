"""What the benchmark scripts share: fresh databases, PostgreSQL's own counters, and
the counters the scripts attach to an engine. Not part of the package; the scripts run
as ``.venv/bin/python benchmarks/<name>.py``, which puts this directory on the path."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from treadle.adapters.sql import sync_url
from treadle.testing.databases import postgres_database


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextlib.contextmanager
def fresh_database(backend: str, pg_url: str) -> Iterator[str]:
    """A URL of a new, empty database: a PostgreSQL database created on ``pg_url``'s
    server (dropped afterwards), or a SQLite file in a temporary directory (its scheme
    ``$TREADLE_BENCH_SQLITE_SCHEME``, default ``sqlite``: ``sqlite+aiosqlite`` measures
    the aiosqlite driver instead of the inline one)."""
    if backend == "postgres":
        with postgres_database(server_url=pg_url, prefix="treadle_bench") as url:
            yield url
    else:
        with tempfile.TemporaryDirectory() as tmp:
            scheme = os.environ.get("TREADLE_BENCH_SQLITE_SCHEME", "sqlite")
            yield f"{scheme}:///{Path(tmp) / 'bench.db'}"


def libpq_url(url: str) -> str:
    """``url`` (any SQLAlchemy PostgreSQL URL) as a plain ``postgresql://`` URL."""
    return sync_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def xact_commit(url: str) -> int:
    """Committed transactions of this database so far (flushed statistics). The probe's
    own connection adds two of its own, counted by the next reading."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def settled_xact_commit(url: str, timeout: float = 10.0) -> int:
    """Committed transactions of this database so far, read once every other session
    of it has gone: an exiting backend flushes its statistics before it leaves
    ``pg_stat_activity``, so a reading taken after an engine closed counts all of that
    engine's work. The probe is one transaction however long it waits: it adds one
    commit to the next reading."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(libpq_url(url)) as conn:
        while True:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
            if row is not None and row[0] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{row[0] if row else '?'} sessions still on {url}")
            time.sleep(0.02)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def pg_version(url: str) -> str:
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, from /proc (``None`` if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """CPU of the PostgreSQL backends serving ONE database (``url``'s), over a span: on a
    machine other people's tests share, every ``postgres`` process would count their
    work too. ``start()`` notes the CPU of each client backend connected now and starts a
    thread that samples the backends every ``every`` seconds (a pool may close a
    connection and open another during the span: an exited backend counts up to its
    last sample); ``stop()`` samples once more, stops the thread and returns the CPU
    seconds spent in between (a backend connected since counts in full). Client backends
    only: an autovacuum worker of the database would count in full if it happened to run
    during a sample and not at all otherwise, a lottery. The sampler's own backend is
    left out, and the thread's own CPU (a few milliseconds a second) counts as this
    process's. The server is local here."""

    def __init__(self, url: str, every: float = 0.25) -> None:
        self.url = url
        self.every = every
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop: Any = None
        self._thread: Any = None
        self._conn: Any = None

    def _sample(self) -> None:
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()
        for (pid,) in rows:
            cpu = _process_cpu(int(pid))
            if cpu is not None:
                self._last[int(pid)] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def start(self) -> None:
        import threading

        import psycopg

        self._conn = psycopg.connect(libpq_url(self.url), autocommit=True)
        self._sample()
        self._first = dict(self._last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._conn.close()
        return sum(cpu - self._first.get(pid, 0.0) for pid, cpu in self._last.items())


def count_sql(engine: Any) -> tuple[list[int], list[int]]:
    """Counters of the COMMITs and the statements (besides BEGIN/COMMIT; an
    executemany counts once) that ``engine`` (a ``treadle.Engine`` on SQL) runs from now
    on, as one-element lists the caller reads at the end."""
    commits, statements = [0], [0]
    assert engine.backend is not None
    sync_engine = engine.backend.persistence.engine.sync_engine
    sa.event.listen(sync_engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))
    sa.event.listen(
        sync_engine,
        "before_cursor_execute",
        lambda *args: statements.__setitem__(0, statements[0] + 1),
    )
    return commits, statements


class Finished:
    """Counts the runs of a ``counting_pipeline`` that reached their last stage, and sets
    ``event`` once ``target`` did (a target of -1 counts nothing: warm-up runs)."""

    def __init__(self) -> None:
        self.count = 0
        self.target = -1
        self.event: Any = None

    def expect(self, target: int) -> None:
        import asyncio

        self.count, self.target, self.event = 0, target, asyncio.Event()

    def hit(self) -> None:
        if self.target > 0:
            self.count += 1
            if self.count >= self.target:
                self.event.set()


def counting_pipeline(workflow_id: str, stages: int, finished: Finished) -> Any:
    """A pipeline of ``stages`` no-op stages whose last one reports to ``finished``: the
    benchmarks wait on it in process rather than poll the database (which would add its
    own commits to the figures)."""
    from pydantic import BaseModel

    from treadle import WorkflowBuilder, define_stage

    class Payload(BaseModel):
        n: int

    def stage(index: int) -> Any:
        @define_stage(id=f"s{index}", input=Payload, output=Payload)
        async def noop(ctx):  # type: ignore[no-untyped-def]
            if index == stages - 1:
                finished.hit()
            return ctx.input

        return noop

    builder = WorkflowBuilder(workflow_id, input=Payload)
    for i in range(stages):
        builder = builder.pipe(stage(i))
    return builder.build()


def sdk_telemetry() -> Any:
    """``--tracing sdk``: an ``OtelTelemetry`` on the OpenTelemetry SDK, as a deployment
    with tracing and metrics on has it: a ``BatchSpanProcessor`` feeding an exporter that
    drops the spans (so the figure is Treadle's and the SDK's cost, not a collector's),
    and a ``MeterProvider`` with an in-memory reader (every counter and histogram
    recorded; nothing scrapes it during the run)."""
    from collections.abc import Sequence

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from treadle.adapters.otel import OtelTelemetry

    class Dropping(SpanExporter):
        def __init__(self) -> None:
            self.exported = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Dropping()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return OtelTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
