"""Correctness under concurrency (issue 3, requirement 7), with real OS processes.

Two worker processes (``concurrency_worker.py``, one ``Worker`` with four slots each)
share one database. The test waits until both print ``ready``, starts the runs, and
waits for both to exit once every run is terminal. Then it proves from the database and
the processes' execution records that:

* every run completed, every stage and job finished on its first attempt;
* every stage result was committed exactly once (one ``stage:completed`` per stage);
* every stage body ran exactly once, so no job ran on two workers at once (and, even
  if one had run twice, the intervals are checked for overlap);
* both processes did work (the claims really raced);
* every run's outbox sequence is gap-free.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from treadle import Engine
from treadle.adapters.sql import schema as t

SCRIPT = Path(__file__).with_name("concurrency_worker.py")
PROCESSES = 2


def _pipeline() -> Any:
    spec = importlib.util.spec_from_file_location("treadle_concurrency_worker", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PIPELINE


async def _run_scenario(url: str, runs: int, tmp_path: Path) -> dict[str, Any]:
    pipeline = _pipeline()
    engine = await Engine.open(url, workflows=[pipeline], auto_migrate=True)
    outs = [tmp_path / f"records-{i}.jsonl" for i in range(PROCESSES)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--url",
            url,
            "--runs",
            str(runs),
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
        started = time.monotonic()
        run_ids = [(await engine.start(pipeline.id, {"n": i})).run_id for i in range(runs)]
        results = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate() for proc in procs)), 100
        )
        elapsed = time.monotonic() - started
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err.decode()[-3000:]
        facts = await _facts(engine, run_ids)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await engine.aclose()
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    facts["records"] = records
    facts["elapsed"] = elapsed
    return facts


async def _facts(engine: Engine, run_ids: list[str]) -> dict[str, Any]:
    assert engine.backend is not None
    sql_engine = engine.backend.persistence.engine  # type: ignore[attr-defined]
    async with sql_engine.connect() as conn:
        runs = (await conn.execute(sa.select(t.runs.c.id, t.runs.c.status))).all()
        stages = (
            await conn.execute(sa.select(t.stages.c.status, t.stages.c.attempt, t.stages.c.output))
        ).all()
        jobs = (await conn.execute(sa.select(t.jobs.c.status, t.jobs.c.attempts))).all()
        sequences = (await conn.execute(sa.select(t.outbox.c.run_id, t.outbox.c.sequence))).all()
        completed = (
            await conn.execute(
                sa.select(t.outbox.c.run_id, t.outbox.c.event["stage_id"].as_string()).where(
                    t.outbox.c.event_type == "stage:completed"
                )
            )
        ).all()
    return {
        "run_ids": run_ids,
        "runs": runs,
        "stages": stages,
        "jobs": jobs,
        "completed_events": Counter((run_id, stage_id) for run_id, stage_id in completed),
        "sequences": sequences,
    }


def _check(facts: dict[str, Any], runs: int) -> None:
    assert len(facts["runs"]) == runs
    assert Counter(status for _, status in facts["runs"]) == {"COMPLETED": runs}
    assert {(status, attempt) for status, attempt, _ in facts["stages"]} == {("COMPLETED", 1)}
    assert len(facts["stages"]) == 3 * runs
    assert Counter(facts["jobs"]) == {("COMPLETED", 1): 3 * runs}

    # Per-run outbox sequences are gap-free (1..n) although both processes appended.
    per_run: dict[str, list[int]] = defaultdict(list)
    for run_id, sequence in facts["sequences"]:
        per_run[run_id].append(int(sequence))
    assert len(per_run) == runs
    assert all(sorted(seqs) == list(range(1, len(seqs) + 1)) for seqs in per_run.values())

    # Exactly one committed result per stage.
    events = facts["completed_events"]
    assert len(events) == 3 * runs
    assert set(events.values()) == {1}

    # Every body ran once; had any run twice, no two executions may overlap in time.
    records = facts["records"]
    by_stage: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_stage[(record["run_id"], record["stage_id"])].append(record)
    overlaps = []
    for key, executions in by_stage.items():
        executions.sort(key=lambda r: r["start"])
        for earlier, later in itertools.pairwise(executions):
            if later["start"] < earlier["end"]:
                overlaps.append((key, earlier, later))
    assert overlaps == []
    assert len(by_stage) == 3 * runs
    assert {len(v) for v in by_stage.values()} == {1}
    # Both processes executed stages: the claims and dequeues really competed.
    per_process = Counter(record["pid"] for record in records)
    assert len(per_process) == PROCESSES, per_process


@pytest.mark.postgres
@pytest.mark.timeout(150)
async def test_two_processes_on_postgres_run_500_pipelines_exactly_once(
    postgres_url: str, tmp_path: Path
) -> None:
    """500 three-stage runs over two processes with four workers each, on PostgreSQL."""
    facts = await _run_scenario(postgres_url, 500, tmp_path)
    _check(facts, 500)
    print(f"postgres: 500 runs / 1500 stages in {facts['elapsed']:.1f}s")


@pytest.mark.timeout(150)
async def test_two_processes_on_sqlite_run_100_pipelines_exactly_once(
    sqlite_url: str, tmp_path: Path
) -> None:
    """100 three-stage runs over two processes sharing one SQLite file."""
    facts = await _run_scenario(sqlite_url, 100, tmp_path)
    _check(facts, 100)
    print(f"sqlite: 100 runs / 300 stages in {facts['elapsed']:.1f}s")
