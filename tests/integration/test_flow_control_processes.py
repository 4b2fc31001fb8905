"""Concurrency limits hold across worker processes (issue 14, section 2), on PostgreSQL.

Three worker processes (``limits_worker.py``, four slots each: twelve slots against
limits of three runs in all and two per key, and four starts per second for a rated
workflow) share one database. Every stage execution
is recorded with its wall-clock interval; a run holds its slot from its first stage's
start to its last stage's end, so the test sweeps those intervals and checks the most
runs ever inside them at once, per key and in all, never passes the limits. The limits
must also have bound (the slots outnumber them) and every run must complete. The rated
runs' stored start times must never put more than four starts in one second.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from treadle import Engine

SCRIPT = Path(__file__).with_name("limits_worker.py")
PROCESSES = 3
RUNS = {"a": 10, "b": 8}
RATED_RUNS = 12


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("treadle_limits_worker", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals open at one instant (an interval
    ending exactly when another starts does not overlap it)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = inside = 0
    for _, step in points:
        inside += step
        most = max(most, inside)
    return most


@pytest.mark.postgres
async def test_three_processes_never_run_more_than_the_limits(
    treadle_postgres_url: str, tmp_path: Path
) -> None:
    module = _module()
    total = sum(RUNS.values()) + RATED_RUNS
    engine = await Engine.open(treadle_postgres_url, workflows=[module.PIPELINE, module.RATED])
    outs = [tmp_path / f"records-{i}.jsonl" for i in range(PROCESSES)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--url",
            treadle_postgres_url,
            "--runs",
            str(total),
            "--out",
            str(out),
            "--deadline",
            "90",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for out in outs
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"ready", line
        items = [
            {"workflow_id": module.WORKFLOW_ID, "input": {"key": key}, "concurrency_key": key}
            for key, count in RUNS.items()
            for _ in range(count)
        ] + [{"workflow_id": module.RATED_ID, "input": {"key": "r"}}] * RATED_RUNS
        await engine.start_many(items)
        results = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate() for proc in procs)), 100
        )
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err.decode()[-3000:]
        counts = await engine.aggregate("status")
        rated = await engine.list(workflow_id=module.RATED_ID, limit=100)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await engine.close()
    assert counts == {"COMPLETED": total}
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    # The rate limit: no window of ``per`` (one second) holds more than ``starts`` starts.
    starts = sorted(run.started_at for run in rated if run.started_at is not None)
    assert len(starts) == RATED_RUNS
    per, most = module.RATE.per, module.RATE.starts
    assert max(sum(1 for s in starts if t - per < s <= t) for t in starts) == most
    records = [r for r in records if r["stage_id"] != "only"]
    assert len(records) == 2 * (total - RATED_RUNS)  # two stages per run, each ran once
    spans: dict[str, list[float]] = {}
    keys: dict[str, str] = {}
    for record in records:
        span = spans.setdefault(record["run_id"], [record["start"], record["end"]])
        span[0], span[1] = min(span[0], record["start"]), max(span[1], record["end"])
        keys[record["run_id"]] = record["key"]
    per_key = {
        key: _most_at_once([tuple(spans[r]) for r in spans if keys[r] == key])  # type: ignore[misc]
        for key in RUNS
    }
    overall = _most_at_once([tuple(span) for span in spans.values()])  # type: ignore[misc]
    assert per_key == {"a": module.PER_KEY, "b": module.PER_KEY}  # reached, never passed
    assert overall == module.TOTAL
    assert len(Counter(record["pid"] for record in records)) >= 2  # the claims really raced
