"""Kernel overhead per stage on the in-memory adapters.

1,000 runs of a 10-stage no-op pipeline driven by ``TestEngine`` (the real kernel:
claim, three-phase job.execute with per-attempt idempotency keys, transition,
outbox flush). The figure is wall time divided by stages executed, so it is the
engine's own cost: the stage bodies do nothing. Median of 5 repetitions, then a
cProfile of one more repetition for the top costs.

    .venv/bin/python benchmarks/kernel_overhead.py [--runs 1000] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import platform
import pstats
import statistics
import time

from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.testing import TestEngine

STAGES = 10


class Payload(BaseModel):
    n: int


def _make_stage(index: int):  # type: ignore[no-untyped-def]
    @define_stage(id=f"s{index}", input=Payload, output=Payload)
    async def noop(ctx):  # type: ignore[no-untyped-def]
        return ctx.input

    return noop


def build_pipeline():  # type: ignore[no-untyped-def]
    builder = WorkflowBuilder("noop-10", input=Payload)
    for i in range(STAGES):
        builder = builder.pipe(_make_stage(i))
    return builder.build()


async def one_rep(runs: int) -> float:
    engine = TestEngine([build_pipeline()])
    for i in range(runs):
        await engine.start("noop-10", {"n": i})
    started = time.perf_counter()
    await engine.run_until_idle()
    elapsed = time.perf_counter() - started
    completed = sum(1 for r in engine.persistence.runs.values() if r.status.value == "COMPLETED")
    if completed != runs:
        raise SystemExit(f"only {completed}/{runs} runs completed")
    return elapsed / (runs * STAGES) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}")
    print(
        f"workload: {args.runs} runs x {STAGES} no-op stages, in-memory adapters, {args.reps} reps"
    )
    samples = [asyncio.run(one_rep(args.runs)) for _ in range(args.reps)]
    print("per-stage overhead (us): " + ", ".join(f"{s:.1f}" for s in samples))
    print(f"median: {statistics.median(samples):.1f} us/stage (target < 100)")

    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(one_rep(args.runs))
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"top {args.top} functions by own time (profiled run, slower than unprofiled):")
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(lines[start : start + args.top + 1]))


if __name__ == "__main__":
    main()
