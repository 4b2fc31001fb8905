"""Kernel overhead per stage on the in-memory adapters.

1,000 runs of a 10-stage no-op pipeline driven by ``TestEngine`` (the real kernel:
claim, three-phase job.execute with per-attempt idempotency keys, transition,
outbox flush). The figure is wall time divided by stages executed, so it is the
engine's own cost: the stage bodies do nothing. Median of 5 repetitions, then a
cProfile of one more repetition for the top costs.

Wall time on a shared 2-core machine moves with whatever else runs, so the script
also prints what does not: the load average around the measurement, the process's
CPU time, the share spent in the cyclic garbage collector (which walks the in-memory
store's growing heap), and the Python function calls per stage counted by the
profiler, which are the same on every run.

    .venv/bin/python benchmarks/kernel_overhead.py [--runs 1000] [--reps 5] [--no-chain]
        [--tracing off|sdk] [--gc-census]

``TestEngine`` chains stages as the worker does (``--no-chain`` dequeues every stage).

Instructions per stage, which no other process on the machine can change (valgrind;
the 20-run process is subtracted from the 120-run one, leaving 1,000 stages)::

    for r in 20 120; do PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no \
        --cachegrind-out-file=/dev/null .venv/bin/python benchmarks/kernel_overhead.py \
        --runs $r --reps 1 --no-profile 2>&1 | grep 'I *refs'; done
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
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


class _GcTimer:
    """Wall time spent in the cyclic garbage collector while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1


class _GcCensus:
    """What the cyclic collector did while ``on``, counted rather than timed (the same on
    every run): its passes per generation, and the objects those passes examined (the
    sizes of the generations each pass collected, read as it starts)."""

    def __init__(self) -> None:
        self.on = False
        self.passes = [0, 0, 0]
        self.examined = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.on or phase != "start":
            return
        generation = info["generation"]
        self.passes[generation] += 1
        self.examined += sum(len(gc.get_objects(g)) for g in range(generation + 1))


async def gc_census(runs: int, *, chain: bool = True) -> tuple[_GcCensus, int]:
    """One repetition under ``_GcCensus``; also returns the tracked objects it left."""
    census = _GcCensus()
    engine = TestEngine([build_pipeline()], chain=chain)
    for i in range(runs):
        await engine.start("noop-10", {"n": i})
    gc.collect()
    before = len(gc.get_objects())
    gc.callbacks.append(census)
    census.on = True
    await engine.run_until_idle()
    census.on = False
    gc.callbacks.remove(census)
    gc.collect()
    return census, len(gc.get_objects()) - before


async def one_rep(
    runs: int,
    gc_timer: _GcTimer | None = None,
    profiler: cProfile.Profile | None = None,
    *,
    chain: bool = True,
    telemetry: object = None,
) -> tuple[float, float, float]:
    """(wall, CPU, GC) microseconds per stage of one repetition; ``profiler`` (if given)
    covers the measured part only, not the set-up's ``run.create`` calls."""
    engine = TestEngine([build_pipeline()], chain=chain, telemetry=telemetry)
    for i in range(runs):
        await engine.start("noop-10", {"n": i})
    if gc_timer is not None:
        gc_timer.seconds, gc_timer.on = 0.0, True
    if profiler is not None:
        profiler.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    await engine.run_until_idle()
    if profiler is not None:
        profiler.disable()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    gc_seconds = 0.0
    if gc_timer is not None:
        gc_timer.on = False
        gc_seconds = gc_timer.seconds
    completed = sum(1 for r in engine.persistence.runs.values() if r.status.value == "COMPLETED")
    if completed != runs:
        raise SystemExit(f"only {completed}/{runs} runs completed")
    stages = runs * STAGES
    return elapsed / stages * 1e6, cpu / stages * 1e6, gc_seconds / stages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profiled repetition (for valgrind)"
    )
    parser.add_argument(
        "--no-chain",
        action="store_true",
        help="TestEngine(chain=False): every stage dequeued, as before chained stages",
    )
    parser.add_argument(
        "--tracing",
        choices=["off", "sdk"],
        default="off",
        help="sdk: TestEngine(telemetry=) the OpenTelemetry SDK set-up of _common.sdk_telemetry",
    )
    parser.add_argument(
        "--gc-census",
        action="store_true",
        help="one more repetition counting the collector's passes and the objects they examined",
    )
    args = parser.parse_args()
    chain = not args.no_chain
    telemetry = None
    if args.tracing == "sdk":
        from _common import sdk_telemetry

        telemetry = sdk_telemetry()

    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}")
    print(
        f"workload: {args.runs} runs x {STAGES} no-op stages, in-memory adapters, {args.reps} reps"
        f", chained stages {'on' if chain else 'off'}"
    )
    load_before = os.getloadavg()
    gc_timer = _GcTimer()
    gc.callbacks.append(gc_timer)
    samples = [
        asyncio.run(one_rep(args.runs, gc_timer, chain=chain, telemetry=telemetry))
        for _ in range(args.reps)
    ]
    gc.callbacks.remove(gc_timer)
    load_after = os.getloadavg()
    wall = [w for w, _, _ in samples]
    print("per-stage overhead (us): " + ", ".join(f"{s:.1f}" for s in wall))
    print(f"median: {statistics.median(wall):.1f} us/stage (target < 100)")
    print(
        f"median CPU time: {statistics.median(c for _, c, _ in samples):.1f} us/stage, "
        f"of which in the garbage collector: {statistics.median(g for _, _, g in samples):.1f}"
    )
    print(
        "load average (1 min) before/after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cpus"
    )

    if args.gc_census:
        census, left = asyncio.run(gc_census(args.runs, chain=chain))
        stages = args.runs * STAGES
        print(
            f"garbage collector (counted): passes gen0/gen1/gen2 {census.passes[0]}/"
            f"{census.passes[1]}/{census.passes[2]}, objects examined per stage "
            f"{census.examined / stages:.0f}, tracked objects left per stage {left / stages:.1f}"
        )
    if args.no_profile:
        return
    profiler = cProfile.Profile()
    asyncio.run(one_rep(args.runs, profiler=profiler, chain=chain, telemetry=telemetry))
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    per_stage = stats.total_calls / (args.runs * STAGES)  # type: ignore[attr-defined]
    print(f"function calls per stage (profiled rep, deterministic): {per_stage:.0f}")
    stats.sort_stats("tottime").print_stats(args.top)
    print(f"top {args.top} functions by own time (profiled run, slower than unprofiled):")
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(lines[start : start + args.top + 1]))


if __name__ == "__main__":
    main()
