"""Cost of one signal wake-up of a code workflow as its journal grows (issue 11).

One run of a workflow whose body loops ``await ctx.wait_for_signal("tick")`` N times;
the body journals one entry per wake-up, so before the k-th wake-up its journal holds k
entries. Each wake-up is driven by hand, with nothing else running: ``run.signal``
(the inbox write that wakes the suspended run), then the dequeue of the activation job
it queued and its ``job.execute`` (the body resumes, takes the signal, and suspends on
the next wait). The figure per wake-up is the wall time of those three calls, and the
process CPU time they used; a window of wake-ups around the 100th and the 2,000th gives
the median of each (the machine is shared, so single samples are noisy). On SQL it
also counts the statements each wake-up ran, which do not depend on the machine's load.

Run it with sticky execution on (the default) and off (``--sticky off``: every
activation replays the body from the top over the whole journal, the fallback):

    .venv/bin/python benchmarks/resume_cost.py [--wakeups 2000] [--window 20]
        [--backend memory,postgres] [--sticky on|off]
        [--pg-url postgresql://postgres@127.0.0.1:5432/test]

PostgreSQL is skipped (and says so) when the server is not reachable.
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

from _common import count_sql, fresh_database, pg_version

from treadle import Engine, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.kernel import KernelSettings
from treadle.kernel.logging import StdlibLogger

WORKER = "resume-bench"


@workflow(id="ticker", input=int, output=int)
async def ticker(ctx: WorkflowContext, n: int) -> int:
    total = 0
    for _ in range(n):
        tick: int = await ctx.wait_for_signal("tick", int)
        total += tick
    return total


@dataclass
class Sample:
    wall: float
    cpu: float
    signal: float
    statements: int
    """SQL statements the wake-up ran (besides BEGIN/COMMIT); 0 on memory."""


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


STICKY_AVAILABLE = hasattr(KernelSettings(), "sticky_execution")
"""False on a checkout from before issue 11 (replay only), which the script also runs on."""


def _settings(sticky: bool) -> KernelSettings:
    settings = KernelSettings()
    if STICKY_AVAILABLE:
        settings.sticky_execution = sticky
    return settings


async def measure(url: str, wakeups: int, sticky: bool) -> list[Sample]:
    engine = await Engine.open(
        url,
        workflows=[ticker],
        auto_migrate=True,
        settings=_settings(sticky),
        logger=StdlibLogger(),
    )
    samples: list[Sample] = []
    statements = count_sql(engine)[1] if engine.backend.kind != "memory" else [0]  # type: ignore[union-attr]
    try:
        kernel = engine.kernel
        handle = await engine.start("ticker", wakeups)
        await kernel.dispatch(c.RunClaimPending(worker_id=WORKER))
        await _execute_due(engine)  # the first activation: suspends on the first wait
        for i in range(1, wakeups + 1):
            statements[0] = 0
            wall0, cpu0 = time.perf_counter(), time.process_time()
            await engine.signal(handle.run_id, "tick", i)
            signalled = time.perf_counter()
            if await _execute_due(engine) != 1:
                raise SystemExit(f"wake-up {i}: expected exactly one activation")
            samples.append(
                Sample(
                    wall=time.perf_counter() - wall0,
                    cpu=time.process_time() - cpu0,
                    signal=signalled - wall0,
                    statements=statements[0],
                )
            )
        run = await engine.get_run(handle.run_id, with_stages=False)
        if run.output != wakeups * (wakeups + 1) // 2:
            raise SystemExit(f"wrong output {run.output!r} ({run.status.value})")
    finally:
        await engine.aclose()
    return samples


def _window(samples: list[Sample], at: int, width: int) -> list[Sample]:
    """The ``width`` wake-ups ending at the ``at``-th (1-based)."""
    return samples[max(0, at - width) : at]


def report(name: str, samples: list[Sample], window: int, sticky: bool) -> None:
    early, late = 100, len(samples)
    total = sum(s.wall for s in samples)
    mode = ("on" if sticky else "off") if STICKY_AVAILABLE else "not available (replay only)"
    print(f"== {name}: {len(samples)} signal wake-ups, sticky execution {mode}")
    print(f"   all wake-ups: {total:.2f} s wall")
    rows = []
    for at in (early, late):
        picked = _window(samples, at, window)
        wall = statistics.median(s.wall for s in picked) * 1000
        cpu = statistics.median(s.cpu for s in picked) * 1000
        sig = statistics.median(s.signal for s in picked) * 1000
        rows.append((at, wall, cpu, sig))
        sql = statistics.median(s.statements for s in picked)
        print(
            f"   wake-up {at:>5} (median of {len(picked)} up to it): {wall:7.2f} ms wall "
            f"({sig:6.2f} ms run.signal, rest the activation), {cpu:7.2f} ms CPU"
            + (f", {sql:.0f} SQL statements" if sql else "")
        )
    print(
        f"   ratio {late}th / {early}th: {rows[1][1] / rows[0][1]:.2f}x wall, "
        f"{rows[1][2] / rows[0][2]:.2f}x CPU"
    )


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
            report(name, await measure("memory://", args.wakeups, sticky), args.window, sticky)
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
            samples = await measure(url, args.wakeups, sticky)
        report(backend, samples, args.window, sticky)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at the end: {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--wakeups", type=int, default=2000)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--backend", default="memory,postgres")
    parser.add_argument("--sticky", choices=["on", "off"], default="on")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    asyncio.run(amain(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
