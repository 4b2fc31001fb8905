"""Persistence contract, stages (``tx.stages``): insert, read in group order, optimistic
update, the set-oriented forms, due suspended stages.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from treadle.kernel.errors import (
    MAX_TRACEBACK_CHARS,
    ConcurrencyError,
    ConflictError,
    DuplicateError,
)
from treadle.kernel.model import (
    StageStatus,
    evolve,
)
from treadle.tests.contract.persistence.helpers import (
    TRACEBACK,
    assert_utc,
    at,
    make_run,
    make_stage,
    seed,
)


async def test_stage_reads_back_equal(backend: Any) -> None:
    """Every stage field, durations and JSON state included, round-trips exactly."""
    stage = make_stage(
        "r1",
        "poll",
        1,
        status=StageStatus.SUSPENDED,
        attempt=2,
        output={"x": [1, 2]},
        error="transient",
        retryable=True,
        started_at=at(1.5),
        completed_at=at(2.25),
        suspended_state={"batch": "b-1", "ids": [1, 2, 3]},
        next_poll_at=at(60.000001),
        poll_interval=timedelta(minutes=5, microseconds=7),
        suspend_deadline=at(3600),
        resume_state={"ok": True},
        job_id="j1",
        error_traceback=TRACEBACK,
        version=3,
    )
    await seed(backend, make_run("r1"), stages=(stage,))
    async with backend.persistence.transaction() as tx:
        got = await tx.stages.get("r1", "poll")
        assert await tx.stages.get("r1", "nope") is None
        assert await tx.stages.for_run("nope") == []
    assert got == stage
    for moment in (got.started_at, got.completed_at, got.next_poll_at, got.suspend_deadline):
        assert_utc(moment)


async def test_stage_traceback_is_stored_and_cleared_by_update(backend: Any) -> None:
    """A failed attempt's ``error_traceback`` (multi-line, non-ASCII, at its size bound)
    is written by ``update_stage`` and read back exactly; a later update clears it."""
    await seed(backend, make_run("r1"), stages=(make_stage("r1", "s"),))
    long = TRACEBACK + "x" * (MAX_TRACEBACK_CHARS - len(TRACEBACK))
    async with backend.persistence.transaction() as tx:
        stage = await tx.stages.get("r1", "s")
        failed = await tx.stages.update(
            stage.model_copy(
                update={"status": StageStatus.FAILED, "error": "E", "error_traceback": long}
            )
        )
    async with backend.persistence.transaction() as tx:
        got = await tx.stages.get("r1", "s")
        assert got == failed
        assert got.error_traceback == long
        await tx.stages.update(got.model_copy(update={"error_traceback": None}))
    async with backend.persistence.transaction() as tx:
        assert (await tx.stages.get("r1", "s")).error_traceback is None


async def test_get_stages_orders_by_group_then_definition_order(backend: Any) -> None:
    """Stages come back by execution group, then in the order they were inserted."""
    await seed(
        backend,
        make_run("r1"),
        stages=(
            make_stage("r1", "z-late", 2),
            make_stage("r1", "m-first", 0),
            make_stage("r1", "b-par", 1),
            make_stage("r1", "a-par", 1),
        ),
    )
    async with backend.persistence.transaction() as tx:
        await tx.stages.insert_many([make_stage("r1", "c-par", 1)])
    async with backend.persistence.transaction() as tx:
        order = [s.stage_id for s in await tx.stages.for_run("r1")]
    assert order == ["m-first", "b-par", "a-par", "c-par", "z-late"]


async def test_duplicate_stage_raises_duplicate_error(backend: Any) -> None:
    """A stage id is unique within its run; the same id in another run is fine."""
    await seed(backend, make_run("r1"), make_run("r2"), stages=(make_stage("r1", "a"),))
    with pytest.raises(DuplicateError, match="'a'"):
        async with backend.persistence.transaction() as tx:
            await tx.stages.insert_many([make_stage("r1", "a")])
    async with backend.persistence.transaction() as tx:
        await tx.stages.insert_many([make_stage("r2", "a")])
        assert len(await tx.stages.for_run("r2")) == 1


async def test_stages_need_their_run(backend: Any) -> None:
    """Inserting stages for a run that does not exist is a conflict naming the run."""
    with pytest.raises(ConflictError, match="no-run"):
        async with backend.persistence.transaction() as tx:
            await tx.stages.insert_many([make_stage("no-run", "a")])


async def test_update_stage_is_optimistic(backend: Any) -> None:
    """``update_stage`` bumps the version; a stale or missing stage raises ``ConcurrencyError``."""
    await seed(backend, make_run("r1"), stages=(make_stage("r1", "a"),))
    async with backend.persistence.transaction() as tx:
        stale = await tx.stages.get("r1", "a")
        assert stale is not None
        new = await tx.stages.update(
            evolve(stale, {"status": StageStatus.RUNNING, "attempt": 1, "started_at": at(1)})
        )
    assert new.version == 1
    with pytest.raises(ConcurrencyError, match="'a'"):
        async with backend.persistence.transaction() as tx:
            await tx.stages.update(evolve(stale, {"status": StageStatus.FAILED}))
    with pytest.raises(ConcurrencyError):
        async with backend.persistence.transaction() as tx:
            await tx.stages.update(make_stage("r1", "missing"))
    async with backend.persistence.transaction() as tx:
        assert await tx.stages.get("r1", "a") == new


async def test_due_suspended_stages(backend: Any) -> None:
    """SUSPENDED stages due at or before ``now`` come back earliest first, up to ``limit``;
    a stage that leaves SUSPENDED is no longer due."""
    suspended = {"status": StageStatus.SUSPENDED}
    await seed(
        backend,
        make_run("r1"),
        make_run("r2"),
        stages=(
            make_stage("r1", "late", next_poll_at=at(20), **suspended),
            make_stage("r1", "due-now", next_poll_at=at(10), **suspended),
            make_stage("r2", "early", next_poll_at=at(5), **suspended),
            make_stage("r2", "future", next_poll_at=at(11), **suspended),
            make_stage("r2", "running", status=StageStatus.RUNNING, next_poll_at=at(0)),
        ),
    )
    async with backend.persistence.transaction() as tx:
        due = [(s.workflow_run_id, s.stage_id) for s in await tx.stages.due_suspended(at(10), 10)]
        first = [s.stage_id for s in await tx.stages.due_suspended(at(10), 1)]
        early = await tx.stages.get("r2", "early")
        assert early is not None
        await tx.stages.update(evolve(early, {"status": StageStatus.COMPLETED}))
    assert due == [("r2", "early"), ("r1", "due-now")]
    assert first == ["early"]
    async with backend.persistence.transaction() as tx:
        after = [s.stage_id for s in await tx.stages.due_suspended(at(100), 10)]
    assert after == ["due-now", "future", "late"]


async def test_get_stages_of_maps_every_run_to_its_ordered_stages(backend: Any) -> None:
    """Each requested run id maps to exactly ``get_stages(run_id)``: group order, then
    insertion order; ``[]`` for a run without stages or a missing run."""
    await seed(
        backend,
        make_run("r1"),
        make_run("r2"),
        make_run("bare"),
        stages=(
            make_stage("r1", "z-late", 2),
            make_stage("r2", "only", 0, output={"x": 1}),
            make_stage("r1", "m-first", 0),
            make_stage("r1", "b-par", 1),
            make_stage("r1", "a-par", 1),
        ),
    )
    async with backend.persistence.transaction() as tx:
        await tx.stages.insert_many([make_stage("r1", "c-par", 1)])
    async with backend.persistence.transaction() as tx:
        got = await tx.stages.for_runs(["r2", "bare", "r1", "missing"])
        expected = {run_id: await tx.stages.for_run(run_id) for run_id in got}
        assert await tx.stages.for_runs([]) == {}
    assert got == expected
    assert list(got) == ["r2", "bare", "r1", "missing"]
    assert [s.stage_id for s in got["r1"]] == ["m-first", "b-par", "a-par", "c-par", "z-late"]
    assert (got["bare"], got["missing"]) == ([], [])


async def test_update_stages_stores_each_and_bumps_versions_in_order(backend: Any) -> None:
    await seed(
        backend,
        make_run("r1"),
        make_run("r2"),
        stages=(make_stage("r1", "a"), make_stage("r1", "b"), make_stage("r2", "a")),
    )
    async with backend.persistence.transaction() as tx:
        stages = await tx.stages.for_runs(["r1", "r2"])
        changed = [
            evolve(stages["r2"][0], {"status": StageStatus.RUNNING, "started_at": at(1)}),
            evolve(stages["r1"][1], {"status": StageStatus.COMPLETED, "output": {"k": [1]}}),
            evolve(stages["r1"][0], {"attempt": 2, "poll_interval": timedelta(seconds=5)}),
        ]
        new = await tx.stages.update_many(changed)
        assert await tx.stages.update_many([]) == []
    assert new == [evolve(s, {"version": 1}) for s in changed]
    async with backend.persistence.transaction() as tx:
        got = await tx.stages.for_runs(["r1", "r2"])
    assert got == {"r1": [new[2], new[1]], "r2": [new[0]]}


async def test_update_stages_with_a_stale_or_missing_stage_applies_nothing(backend: Any) -> None:
    """One stale (or missing) stage fails the call with a ``ConcurrencyError`` naming it, and
    after the rollback none of the call's stages is changed; a stage twice is a
    ``ValueError``."""
    await seed(backend, make_run("r1"), stages=(make_stage("r1", "a"), make_stage("r1", "b")))
    async with backend.persistence.transaction() as tx:
        old = {s.stage_id: s for s in await tx.stages.for_run("r1")}
        winner = await tx.stages.update(evolve(old["b"], {"status": StageStatus.RUNNING}))
    fresh = old["a"]
    changed = evolve(  # every kind of value: see the update_runs test
        fresh,
        {
            "status": StageStatus.SUSPENDED,
            "attempt": 3,
            "started_at": at(1.5),
            "suspended_state": {"ids": [1, 2.5, None], "ok": False},
            "next_poll_at": at(60.000001),
            "poll_interval": timedelta(minutes=5, microseconds=7),
        },
    )
    attempts = [
        ([changed, evolve(old["b"], {"attempt": 1})], "'b'"),
        ([make_stage("r1", "ghost"), changed], "'ghost'"),
        ([changed, make_stage("no-run", "a")], "'no-run'"),
    ]
    for stages, named in attempts:
        with pytest.raises(ConcurrencyError, match=named) as raised:
            async with backend.persistence.transaction() as tx:
                await tx.stages.update_many(stages)
        assert "'a' of run 'r1'" not in str(raised.value)
    with pytest.raises(ValueError, match="'a'"):
        async with backend.persistence.transaction() as tx:
            await tx.stages.update_many([fresh, evolve(fresh, {"attempt": 5})])
    async with backend.persistence.transaction() as tx:
        assert await tx.stages.for_run("r1") == [fresh, winner]
