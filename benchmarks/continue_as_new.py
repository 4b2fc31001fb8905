"""Cost per signal of an entity workflow that continues as new (issue 14, section 6).

One logical workflow takes N signals; its body loops ``await ctx.wait_for_signal("tick")``
and, every ``--every`` signals, calls ``ctx.continue_as_new(state)``, so no run's journal
or inbox holds more than ``--every`` entries. Each signal is sent the way an entity
workflow is addressed, by its idempotency key (``engine.start_or_signal``, which reaches
the newest run of the chain), then the activations it queued are executed by hand with
nothing else running (the activation that continues also runs the new run's first
activation). Per signal it measures wall time, process CPU time and, on SQL, the
statements run; it prints the mean and the median over the first and the last window of
``--window`` signals (a window of ``--every`` holds exactly one continuation), the
resident memory of the process before and after, and the longest journal of the chain.

    .venv/bin/python benchmarks/continue_as_new.py [--signals 100000] [--every 1000]
        [--window 1000] [--backend memory,sqlite,postgres] [--sql-signals 3000]
        [--sticky on|off] [--pg-url postgresql://postgres@127.0.0.1:5432/test]

``--every 0`` never continues (one run, one growing journal): the comparison. SQLite
and PostgreSQL take ``--sql-signals`` (a smaller count: about 15-60 ms per signal on
this machine); PostgreSQL is skipped (and says so) when the server is not reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import count_sql, fresh_database, pg_version
from pydantic import BaseModel

from treadle import Engine, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.kernel import KernelSettings
from treadle.kernel.logging import StdlibLogger

WORKER = "continue-bench"
KEY = "entity-1"


class Entity(BaseModel):
    total: int = 0
    remaining: int
    every: int


@workflow(id="entity", input=Entity, output=int)
async def entity(ctx: WorkflowContext, state: Entity) -> int:
    total, remaining = state.total, state.remaining
    batch = remaining if state.every <= 0 else min(state.every, remaining)
    for _ in range(batch):
        tick: int = await ctx.wait_for_signal("tick", int)
        total, remaining = total + tick, remaining - 1
    if remaining:
        ctx.continue_as_new(Entity(total=total, remaining=remaining, every=state.every))
    return total


@dataclass
class Sample:
    wall: float
    cpu: float
    statements: int


def rss_mib() -> float:
    """Resident memory of this process now (Linux ``/proc``; 0 elsewhere)."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return 0.0
    pages = int(statm.read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _execute_due(engine: Engine) -> int:
    """Dequeue and execute every due job (the activations), one at a time."""
    kernel = engine.kernel
    done = 0
    while True:
        jobs = await kernel.deps.job_transport.dequeue(WORKER, kernel.deps.clock.now(), limit=1)
        if not jobs:
            return done
        await kernel.dispatch(c.JobExecute(job_id=jobs[0].id, worker_id=WORKER))
        done += 1


@dataclass
class Outcome:
    samples: list[Sample]
    runs: int
    longest_journal: int
    rss_before: float
    rss_after: float


async def measure(url: str, signals: int, every: int, sticky: bool) -> Outcome:
    settings = KernelSettings()
    settings.sticky_execution = sticky
    engine = await Engine.open(
        url, workflows=[entity], auto_migrate=True, settings=settings, logger=StdlibLogger()
    )
    samples: list[Sample] = []
    statements = count_sql(engine)[1] if engine.backend.kind != "memory" else [0]  # type: ignore[union-attr]
    state = {"remaining": signals, "every": every}
    try:
        kernel = engine.kernel
        first = await engine.start("entity", state, idempotency_key=KEY)
        await kernel.dispatch(c.RunClaimPending(worker_id=WORKER))
        await _execute_due(engine)  # the first activation: suspends on the first wait
        rss_before = rss_mib()
        for i in range(1, signals + 1):
            statements[0] = 0
            wall0, cpu0 = time.perf_counter(), time.process_time()
            await engine.start_or_signal("entity", state, "tick", i, idempotency_key=KEY)
            if await _execute_due(engine) < 1:
                raise SystemExit(f"signal {i}: no activation ran")
            samples.append(
                Sample(time.perf_counter() - wall0, time.process_time() - cpu0, statements[0])
            )
        rss_after = rss_mib()
        result = await first.result(timeout=60)
        if result != signals * (signals + 1) // 2:
            raise SystemExit(f"wrong result {result!r}")
        runs, longest, run_id = 0, 0, first.run_id
        while run_id is not None:
            runs += 1
            longest = max(longest, len(await engine.journal(run_id)))
            run_id = (await engine.get_run(run_id, with_stages=False)).continued_as
    finally:
        await engine.close()
    return Outcome(samples, runs, longest, rss_before, rss_after)


def report(name: str, out: Outcome, every: int, window: int, sticky: bool) -> None:
    samples = out.samples
    total = sum(s.wall for s in samples)
    chain = f"continue-as-new every {every}" if every > 0 else "never continuing"
    mode = "on" if sticky else "off"
    print(f"== {name}: {len(samples)} signals, {chain}, sticky execution {mode}")
    print(
        f"   all signals: {total:.2f} s wall; {out.runs} runs in the chain, the longest "
        f"journal {out.longest_journal} entries"
    )
    print(f"   resident memory: {out.rss_before:.1f} MiB before, {out.rss_after:.1f} MiB after")
    rows = []
    for label, picked in (("first", samples[:window]), ("last", samples[-window:])):
        mean = statistics.fmean(s.wall for s in picked) * 1000
        median = statistics.median(s.wall for s in picked) * 1000
        cpu = statistics.fmean(s.cpu for s in picked) * 1000
        sql = statistics.fmean(s.statements for s in picked)
        rows.append((mean, cpu))
        print(
            f"   {label:>5} {len(picked)} signals: {mean:7.3f} ms wall mean, {median:7.3f} ms "
            f"median, {cpu:7.3f} ms CPU mean" + (f", {sql:.1f} SQL statements mean" if sql else "")
        )
    wall, cpu = rows[1][0] / rows[0][0], rows[1][1] / rows[0][1]
    print(f"   ratio last / first: {wall:.2f}x wall, {cpu:.2f}x CPU")


def _reachable(pg_url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(pg_url.replace("+psycopg", ""), connect_timeout=3):
            return None
    except Exception as exc:  # any failure means: skip PostgreSQL
        return f"{type(exc).__name__}: {exc}"


async def amain(args: argparse.Namespace) -> None:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"machine: {platform.machine()} cpus={os.cpu_count()} load average={load} "
        f"python={platform.python_version()}"
    )
    sticky = args.sticky == "on"
    for name in args.backend.split(","):
        if name == "memory":
            out = await measure("memory://", args.signals, args.every, sticky)
            report(name, out, args.every, min(args.window, args.signals), sticky)
            continue
        backend = "postgres" if name in ("postgres", "postgresql") else name
        if backend == "postgres":
            problem = _reachable(args.pg_url)
            if problem is not None:
                print(f"== postgres: skipped, server not reachable ({problem})")
                continue
        with fresh_database(backend, args.pg_url) as url:
            if backend == "postgres":
                print(f"   server: PostgreSQL {pg_version(url)}")
            out = await measure(url, args.sql_signals, args.every, sticky)
        report(backend, out, args.every, min(args.window, args.sql_signals), sticky)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at the end: {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--signals", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--backend", default="memory,sqlite,postgres")
    parser.add_argument("--sql-signals", type=int, default=3000)
    parser.add_argument("--sticky", choices=["on", "off"], default="on")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    asyncio.run(amain(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
