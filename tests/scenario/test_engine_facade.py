"""The client facade (DESIGN §3.3) end to end, with an in-process worker, on every
backend URL: ``memory://``, a SQLite file, and PostgreSQL where a server is reachable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, NonRetryableError, RunStatus, WorkflowBuilder, define_stage
from treadle.kernel.errors import (
    InvalidConfigError,
    InvalidInputError,
    NotSupportedError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    TreadleError,
    TreadleValidationError,
)
from treadle.kernel.model import StageStatus
from treadle.testing.databases import postgres_database


class Num(BaseModel):
    n: int


class AddConfig(BaseModel):
    step: int = 1


STATE: dict[str, Any] = {}
"""Per-test knobs the stage bodies read (reset by the ``engine`` fixture)."""


@define_stage(id="add", input=Num, output=Num, config=AddConfig)
async def add(ctx):  # type: ignore[no-untyped-def]
    STATE["add_calls"] = STATE.get("add_calls", 0) + 1
    return Num(n=ctx.input.n + ctx.config.step)


@define_stage(id="double", input=Num, output=Num)
async def double(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n * 2)


@define_stage(id="flaky", input=Num, output=Num)
async def flaky(ctx):  # type: ignore[no-untyped-def]
    if STATE.get("broken"):
        raise NonRetryableError("flaky is broken")
    return Num(n=-ctx.input.n)


@define_stage(id="gated", input=Num, output=Num)
async def gated(ctx):  # type: ignore[no-untyped-def]
    STATE["entered"].set()
    await STATE["gate"].wait()
    return ctx.input


CALC = WorkflowBuilder("calc", input=Num).pipe(add).pipe(double).build()
FRAGILE = WorkflowBuilder("fragile", input=Num).pipe(add).pipe(flaky).build()
SLOW = WorkflowBuilder("slow", input=Num).pipe(gated).build()
WORKFLOWS = [CALC, FRAGILE, SLOW]


@pytest.fixture
async def engine(url: str) -> AsyncIterator[Engine]:
    STATE.clear()
    STATE["entered"] = asyncio.Event()
    STATE["gate"] = asyncio.Event()
    async with await Engine.open(url, workflows=WORKFLOWS) as opened:
        yield opened


# -- starting and waiting -----------------------------------------------------------------
async def test_start_then_result_with_in_process_worker(engine: Engine) -> None:
    """A started run is claimed at once by the in-process worker (no 10 s tick wait), and
    result() returns its output; get_run shows every stage COMPLETED."""
    async with engine.worker(concurrency=2):
        handle = await engine.start("calc", Num(n=1), config={"add": {"step": 2}})
        assert await handle.result(timeout=1.5) == {"n": 6}
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"n": 6}
    assert [(s.stage_id, s.status, s.attempt) for s in run.stages] == [
        ("add", StageStatus.COMPLETED, 1),
        ("double", StageStatus.COMPLETED, 1),
    ]
    assert run.started_at is not None
    assert run.completed_at is not None


async def test_idempotent_start_returns_the_same_run(engine: Engine) -> None:
    """Starting again with the same idempotency key returns the first run; another key
    starts another run."""
    first = await engine.start("calc", {"n": 1}, idempotency_key="order-1")
    again = await engine.start("calc", {"n": 99}, idempotency_key="order-1")
    other = await engine.start("calc", {"n": 1}, idempotency_key="order-2")
    assert again.run_id == first.run_id
    assert other.run_id != first.run_id
    assert len(await engine.list(workflow_id="calc")) == 2
    assert (await engine.get_run(first.run_id)).input == {"n": 1}


async def test_result_timeout_raises_timeout_error(engine: Engine) -> None:
    """Without a worker the run stays PENDING; result(timeout) gives up with TimeoutError
    and leaves the run untouched."""
    handle = await engine.start("calc", {"n": 1})
    with pytest.raises(TimeoutError, match="PENDING"):
        await handle.result(timeout=0.05)
    assert (await engine.get_run(handle.run_id)).status is RunStatus.PENDING


async def test_invalid_input_names_the_field_and_writes_nothing(engine: Engine) -> None:
    """Bad input or config raises a validation error naming the field; no run exists after."""
    with pytest.raises(InvalidInputError, match=r"input\.n") as info:
        await engine.start("calc", {"n": "not a number"})
    assert [path for path, _ in info.value.errors] == ["input.n"]
    with pytest.raises(InvalidConfigError, match=r"add"):
        await engine.start("calc", {"n": 1}, config={"add": {"step": "x"}})
    assert await engine.list() == []
    assert await engine.aggregate() == {}


async def test_arguments_are_validated_by_name(engine: Engine) -> None:
    """Every bad argument is a TreadleValidationError naming that argument."""
    cases: list[tuple[str, Any]] = [
        ("status", engine.list(status="bogus")),
        ("status", engine.list(status=["pending", "bogus"])),
        ("status", engine.list(status=[])),
        ("limit", engine.list(limit=0)),
        ("offset", engine.list(offset=-1)),
        ("created_after", engine.list(created_after=datetime(2026, 1, 1))),  # naive on purpose
        ("attributes", engine.list(attributes={"k": [1, 2]})),
        ("priority", engine.start("calc", {"n": 1}, priority=101)),
        ("workflow_id", engine.start("", {"n": 1})),
        ("idempotency_key", engine.start("calc", {"n": 1}, idempotency_key="")),
        ("run_id", engine.get_run("")),
        ("run_id", engine.cancel("")),
        ("stage_id", engine.rerun_from("some-run", "")),
        ("by", engine.aggregate(by="colour")),  # type: ignore[arg-type]
    ]
    for argument, call in cases:
        with pytest.raises(TreadleValidationError, match=argument) as info:
            await call
        assert any(path.startswith(argument) for path, _ in info.value.errors), argument
    with pytest.raises(TreadleValidationError, match="poll_interval"):
        await anext(engine.events("some-run", poll_interval=0))
    assert await engine.list() == []


# -- listing and counting ----------------------------------------------------------------
async def test_list_filters_and_pagination(engine: Engine) -> None:
    """list() filters by status (str or enum, any case), workflow, time range and search
    attributes, newest first, and limit/offset page through without overlap."""
    started = [
        await engine.start("calc", {"n": 1}, search_attributes={"customer": "acme"}),
        await engine.start("calc", {"n": 2}),
        await engine.start("fragile", {"n": 3}, search_attributes={"customer": "acme"}),
        await engine.start("calc", {"n": 4}),
        await engine.start("fragile", {"n": 5}),
    ]
    ids = [h.run_id for h in started]
    assert await engine.cancel(ids[1], reason="not needed") is True

    everything = await engine.list()
    assert {r.id for r in everything} == set(ids)
    keys = [(r.created_at, r.id) for r in everything]
    assert keys == sorted(keys, reverse=True)
    assert [r.id for r in await engine.list(status="cancelled")] == [ids[1]]
    several = await engine.list(status=["cancelled", RunStatus.PENDING])
    assert {r.id for r in several} == set(ids)
    assert [r.id for r in await engine.list(status=("CANCELLED",))] == [ids[1]]
    assert await engine.aggregate(status=["cancelled", "failed"]) == {"CANCELLED": 1}
    assert {r.id for r in await engine.list(status=RunStatus.PENDING, workflow_id="calc")} == {
        ids[0],
        ids[3],
    }
    assert {r.id for r in await engine.list(attributes={"customer": "acme"})} == {ids[0], ids[2]}
    assert await engine.list(workflow_id="nope") == []

    pages = [await engine.list(limit=2, offset=offset) for offset in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [r.id for page in pages for r in page] == [r.id for r in everything]

    pivot = everything[2].created_at
    after = await engine.list(created_after=pivot)
    before = await engine.list(created_before=pivot)
    assert {r.id for r in after} == {r.id for r in everything if r.created_at >= pivot}
    assert {r.id for r in before} == {r.id for r in everything if r.created_at < pivot}
    assert await engine.list(created_after=pivot + timedelta(days=1)) == []


async def test_aggregate_counts_by_status_and_workflow(engine: Engine) -> None:
    """aggregate() counts runs per status or per workflow, with the list() filters."""
    a = await engine.start("calc", {"n": 1})
    await engine.start("calc", {"n": 2})
    await engine.start("fragile", {"n": 3}, search_attributes={"tier": "gold"})
    await engine.cancel(a.run_id)
    assert await engine.aggregate() == {"CANCELLED": 1, "PENDING": 2}
    assert await engine.aggregate(by="status", workflow_id="calc") == {
        "CANCELLED": 1,
        "PENDING": 1,
    }
    assert await engine.aggregate(by="workflow_id") == {"calc": 2, "fragile": 1}
    assert await engine.aggregate(by="workflow_id", status="pending") == {
        "calc": 1,
        "fragile": 1,
    }
    assert await engine.aggregate(by="workflow_id", attributes={"tier": "gold"}) == {"fragile": 1}


# -- steering ----------------------------------------------------------------------------
async def test_cancel_pending_and_running_runs(engine: Engine) -> None:
    """cancel() stops a PENDING run and a RUNNING one mid-stage; result() then raises
    RunCancelledError, a second cancel answers False, and the stage's late result is
    discarded."""
    pending = await engine.start("calc", {"n": 1})
    assert await engine.cancel(pending.run_id, reason="changed my mind") is True
    assert await engine.cancel(pending.run_id) is False
    with pytest.raises(RunCancelledError, match="changed my mind"):
        await pending.result(timeout=1)

    async with engine.worker():
        running = await engine.start("slow", {"n": 1})
        await asyncio.wait_for(STATE["entered"].wait(), 1.5)
        assert (await engine.get_run(running.run_id)).status is RunStatus.RUNNING
        assert await running.cancel(reason="too slow") is True
        STATE["gate"].set()
        with pytest.raises(RunCancelledError):
            await running.result(timeout=1)
    run = await engine.get_run(running.run_id)
    assert run.status is RunStatus.CANCELLED
    assert [s.status for s in run.stages] == [StageStatus.CANCELLED]
    assert run.output is None


async def test_rerun_from_a_failed_stage(engine: Engine) -> None:
    """A run failed at a later stage reruns from it after a fix: earlier stages keep their
    outputs and do not run again."""
    STATE["broken"] = True
    async with engine.worker():
        handle = await engine.start("fragile", {"n": 1})
        with pytest.raises(RunFailedError, match="flaky is broken"):
            await handle.result(timeout=1.5)
        STATE["broken"] = False
        rerun = await engine.rerun_from(handle.run_id, "flaky")
        assert rerun.deleted_stages == ["flaky"]
        assert await engine.handle(handle.run_id).result(timeout=1.5) == {"n": -2}
    assert STATE["add_calls"] == 1
    run = await engine.get_run(handle.run_id)
    assert [s.status for s in run.stages] == [StageStatus.COMPLETED, StageStatus.COMPLETED]


async def test_events_in_sequence_order_and_follow(engine: Engine) -> None:
    """events() yields a run's typed events in gap-free sequence order; follow=True tails
    a live run and ends once it is terminal with every event yielded."""
    handle = await engine.start("calc", {"n": 1})

    async def tail() -> list[Any]:
        return [e async for e in engine.events(handle.run_id, follow=True, poll_interval=0.01)]

    follower = asyncio.create_task(tail())
    await asyncio.sleep(0.02)
    assert not follower.done()  # still PENDING: the follower keeps waiting
    async with engine.worker():
        followed = await asyncio.wait_for(follower, 1.5)
    events = [e async for e in engine.events(handle.run_id)]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events] == [  # type: ignore[attr-defined]
        "workflow:created",
        "workflow:started",
        "stage:started",
        "stage:completed",
        "stage:started",
        "stage:completed",
        "workflow:completed",
    ]
    assert [(e.type, e.sequence) for e in followed] == [(e.type, e.sequence) for e in events]  # type: ignore[attr-defined]
    assert events[-1].output == {"n": 4}  # type: ignore[attr-defined]
    tail_only = [e.sequence async for e in engine.events(handle.run_id, after_sequence=5)]
    assert tail_only == [6, 7]
    with pytest.raises(RunNotFoundError):
        await anext(engine.events("no-such-run"))


async def test_annotations_become_search_attributes(engine: Engine) -> None:
    """annotate() records provenance and makes the run findable by its attributes."""
    handle = await engine.start("calc", {"n": 1})
    await engine.annotate(handle.run_id, {"reviewed": True}, actor="alice", idempotency_key="r1")
    await engine.annotate(handle.run_id, {"reviewed": True}, actor="alice", idempotency_key="r1")
    assert len(await engine.annotations(handle.run_id)) == 1
    assert [r.id for r in await engine.list(attributes={"reviewed": True})] == [handle.run_id]


async def test_code_workflow_commands_are_not_supported_for_pipelines(engine: Engine) -> None:
    """signal, update, decide_review, query and start_or_signal dispatch their commands,
    which pipelines refuse with NotSupportedError."""
    handle = await engine.start("calc", {"n": 1})
    calls = [
        engine.signal(handle.run_id, "approval", {"approved": True}),
        engine.update(handle.run_id, "set-limit", {"limit": 3}),
        engine.decide_review(handle.run_id, "review-1", "approved", reviewer="bob"),
        engine.query(handle.run_id, "progress"),
        engine.start_or_signal("calc", {"n": 1}, "approval", idempotency_key="k"),
    ]
    for call in calls:
        with pytest.raises(NotSupportedError, match="pipeline"):
            await call
    assert len(await engine.list()) == 1


async def test_closed_engine_refuses_work(url: str) -> None:
    """After close() (idempotent), the engine raises instead of silently reconnecting."""
    engine = await Engine.open(url, workflows=WORKFLOWS)
    await engine.aclose()
    await engine.aclose()
    with pytest.raises(TreadleError, match="closed"):
        await engine.start("calc", {"n": 1})


# -- backend specifics ----------------------------------------------------------------------
async def test_sqlite_file_survives_reopen_and_keeps_blobs_beside_it(tmp_path: Path) -> None:
    """Engine.open creates and migrates the SQLite file; a second open sees the same runs;
    blobs live in ``<db>.blobs/``."""
    from treadle.adapters.filesystem import FileSystemBlobStore

    db = tmp_path / "app.db"
    async with await Engine.open(f"sqlite:///{db}", workflows=WORKFLOWS) as engine:
        assert db.exists()
        blobs = engine.kernel.deps.blob_store
        assert isinstance(blobs, FileSystemBlobStore)
        assert blobs.root == tmp_path / "app.db.blobs"
        async with engine.worker():
            handle = await engine.start("calc", {"n": 2})
            assert await handle.result(timeout=1.5) == {"n": 6}
    async with await Engine.open(f"sqlite:///{db}", workflows=WORKFLOWS) as reopened:
        assert (await reopened.get_run(handle.run_id)).output == {"n": 6}


async def test_bad_urls_and_workflows_are_rejected(tmp_path: Path) -> None:
    """Unknown schemes, a SQLite file in a missing directory and non-definitions fail with
    errors that say what to do."""
    with pytest.raises(TreadleError, match="unsupported database URL scheme"):
        await Engine.open("mysql://localhost/db")
    with pytest.raises(TreadleError, match="does not exist"):
        await Engine.open(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(TreadleValidationError, match=r"workflows\[1\]"):
        await Engine.open("memory://", workflows=[CALC, "calc"])  # type: ignore[list-item]


@pytest.mark.postgres
async def test_postgres_schema_must_be_migrated_unless_auto_migrate() -> None:
    """An unmigrated PostgreSQL database is refused with a pointer to `treadle migrate`;
    auto_migrate=True migrates it and the engine works."""
    with postgres_database(prefix="treadle_facade") as url:
        with pytest.raises(TreadleError, match="treadle migrate"):
            await Engine.open(url, workflows=WORKFLOWS)
        engine = await Engine.open(url, workflows=WORKFLOWS, auto_migrate=True)
        async with engine, engine.worker():
            handle = await engine.start("calc", {"n": 1})
            assert await handle.result(timeout=1.5) == {"n": 4}
        async with await Engine.open(url, workflows=WORKFLOWS) as again:
            assert (await again.get_run(handle.run_id)).status is RunStatus.COMPLETED


def test_engine_import_does_not_load_sqlalchemy() -> None:
    """`import treadle` and `treadle.Engine` stay light: SQL drivers load only for SQL URLs."""
    import subprocess
    import sys

    code = (
        "import sys, treadle, treadle.runtime; treadle.Engine;"
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
