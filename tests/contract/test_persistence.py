"""Persistence contract: every adapter (memory, SQLite, PostgreSQL) stores and returns the
same typed values, raises the same domain errors and rolls back completely.

Time is passed in explicitly (no sleeps); every timestamp carries microseconds so a
round trip that truncates or drops the timezone is caught.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from treadle.kernel.errors import (
    MAX_TRACEBACK_CHARS,
    ConcurrencyError,
    ConflictError,
    DuplicateError,
    TreadleError,
)
from treadle.kernel.events import (
    AnnotationCreated,
    ChildFinished,
    ChildStarted,
    EventBase,
    ReviewDecided,
    ReviewRequested,
    SagaCompensated,
    SignalReceived,
    StageCompleted,
    StageFailed,
    StageProgress,
    StageStarted,
    StageSuspended,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowCreated,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowSuspended,
)
from treadle.kernel.model import (
    Annotation,
    IdempotencyRecord,
    IdempotencyState,
    Job,
    LogRecord,
    Run,
    RunFilter,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/flows.py", line 12, in extract\n'
    "    return parse(ctx.input.url)\n"
    "ZeroDivisionError: division by zero — über\n"
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_run(run_id: str, **fields: Any) -> Run:
    fields.setdefault("workflow_id", "wf")
    fields.setdefault("created_at", T0)
    fields.setdefault("updated_at", fields["created_at"])
    return Run(id=run_id, **fields)


def make_stage(run_id: str, stage_id: str, group: int = 0, **fields: Any) -> StageRun:
    return StageRun(workflow_run_id=run_id, stage_id=stage_id, execution_group=group, **fields)


def created(run_id: str, seconds: float = 0) -> WorkflowCreated:
    return WorkflowCreated(
        workflow_run_id=run_id, timestamp=at(seconds), workflow_id="wf", priority=5
    )


def assert_utc(moment: datetime | None) -> None:
    assert moment is not None
    assert moment.tzinfo is not None
    assert moment.utcoffset() == timedelta(0)


class BoomError(Exception):
    """Raised inside a transaction to force its rollback."""


async def fail_after(backend: Any, writes: Callable[[Any], Awaitable[object]]) -> None:
    """Run ``writes`` in a transaction that then raises ``BoomError``, forcing a rollback."""
    async with backend.persistence.transaction() as tx:
        await writes(tx)
        raise BoomError


async def seed(backend: Any, *runs: Run, stages: tuple[StageRun, ...] = ()) -> None:
    async with backend.persistence.transaction() as tx:
        for run in runs:
            await tx.runs.insert(run)
        if stages:
            await tx.stages.insert_many(list(stages))


# -- runs ---------------------------------------------------------------------------


async def test_inserted_run_reads_back_equal(backend: Any) -> None:
    """Every run field, JSON payloads and microsecond UTC timestamps included, round-trips."""
    run = make_run(
        "r1",
        workflow_version="7",
        status=RunStatus.RUNNING,
        input={"url": "https://x", "n": [1, 2.5, None, True], "nested": {"é": "ü"}},
        config={"extract": {"max_length": 10}},
        output=["a", {"b": 1}],
        error="boom",
        priority=9,
        idempotency_key="key-1",
        parent_run_id="parent",
        search_attributes={"customer": "acme", "tier": 2},
        created_at=at(0),
        started_at=at(1.000001),
        completed_at=at(2.999999),
        updated_at=at(3),
        worker_id="w1",
        current_group=2,
        version=4,
    )
    await seed(backend, run)
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got == run
    for moment in (got.created_at, got.started_at, got.completed_at, got.updated_at):
        assert_utc(moment)


async def test_timestamps_keep_their_instant_across_zones_and_extremes(backend: Any) -> None:
    """A time given in another zone, or at the ends of the datetime range, reads back as the
    same instant, and filters and sorts by instant, not by wall-clock text."""
    plus_two = datetime(2026, 1, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))  # 10:00Z
    times = {
        "zoned": plus_two,
        "utc-later": datetime(2026, 1, 1, 11, tzinfo=UTC),
        "ancient": datetime(1, 1, 2, tzinfo=UTC),
        "far": datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
    }
    await seed(backend, *(make_run(k, created_at=v) for k, v in times.items()))
    async with backend.persistence.transaction() as tx:
        for run_id, moment in times.items():
            got = await tx.runs.get(run_id)
            assert got is not None
            assert got.created_at == moment
        ordered = [r.id for r in await tx.runs.query(RunFilter())]
        after = [r.id for r in await tx.runs.query(RunFilter(created_after=plus_two))]
        before = [r.id for r in await tx.runs.query(RunFilter(created_before=plus_two))]
    assert ordered == ["far", "utc-later", "zoned", "ancient"]
    assert after == ["far", "utc-later", "zoned"]
    assert before == ["ancient"]


async def test_get_run_returns_the_run_without_stages(backend: Any) -> None:
    """Stages live in their own table: a run read back has an empty ``stages`` list."""
    await seed(backend, make_run("r1"), stages=(make_stage("r1", "a"),))
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
        locked = await tx.runs.get("r1", for_update=True)
    assert got is not None
    assert got.stages == []
    assert locked == got


async def test_missing_run_reads_as_none(backend: Any) -> None:
    """Reading an unknown run id or idempotency key gives ``None``, not an error."""
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("nope") is None
        assert await tx.runs.get("nope", for_update=True) is None
        assert await tx.runs.find_by_key("wf", "nope") is None


async def test_duplicate_run_id_raises_duplicate_error(backend: Any) -> None:
    """A second insert with the same run id raises ``DuplicateError`` and stores nothing."""
    await seed(backend, make_run("r1", priority=1))
    with pytest.raises(DuplicateError, match="r1"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.insert(make_run("r1", priority=2))
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got is not None
    assert got.priority == 1


async def test_duplicate_idempotency_key_raises_duplicate_error(backend: Any) -> None:
    """(workflow, idempotency key) is unique: a second run with both raises ``DuplicateError``."""
    await seed(backend, make_run("r1", idempotency_key="k"))
    with pytest.raises(DuplicateError, match="'k'"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.insert(make_run("r2", idempotency_key="k"))
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is None
        found = await tx.runs.find_by_key("wf", "k")
    assert found is not None
    assert found.id == "r1"


async def test_idempotency_keys_are_scoped_per_workflow_and_none_never_collides(
    backend: Any,
) -> None:
    """The same key on another workflow, and any number of runs without a key, are fine."""
    await seed(
        backend,
        make_run("r1", idempotency_key="k"),
        make_run("r2", workflow_id="other", idempotency_key="k"),
        make_run("r3"),
        make_run("r4"),
    )
    async with backend.persistence.transaction() as tx:
        one = await tx.runs.find_by_key("wf", "k")
        other = await tx.runs.find_by_key("other", "k")
    assert one is not None
    assert one.id == "r1"
    assert other is not None
    assert other.id == "r2"


async def test_a_caught_duplicate_leaves_the_transaction_usable(backend: Any) -> None:
    """Catching ``DuplicateError`` mid-transaction lets the rest of it commit."""
    await seed(backend, make_run("r1"))
    async with backend.persistence.transaction() as tx:
        with pytest.raises(DuplicateError):
            await tx.runs.insert(make_run("r1"))
        await tx.runs.insert(make_run("r2"))
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is not None


async def test_insert_runs_stores_each_and_finds_them_by_key(backend: Any) -> None:
    """``insert_runs`` writes every run as ``insert_run`` would; ``find_runs_by_keys``
    returns the runs of the (workflow, key) pairs it finds, in one call."""
    runs = [
        make_run(
            f"r{i}",
            workflow_id="wf" if i % 2 else "other",
            idempotency_key=None if i == 3 else f"k{i // 2}",
            input={"i": i, "nested": {"é": [i, None]}},
            config={"s": {"n": i}},
            priority=i,
            search_attributes={"tier": i},
            created_at=at(i + 0.000001),
        )
        for i in range(6)
    ]
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert_many(runs)
        # Seen inside the transaction already, as later statements of run.createMany need.
        inside = await tx.runs.find_by_keys([("wf", "k0")])
    assert inside == {("wf", "k0"): runs[1]}
    async with backend.persistence.transaction() as tx:
        got = [await tx.runs.get(run.id) for run in runs]
        found = await tx.runs.find_by_keys(
            [("other", "k0"), ("wf", "k2"), ("wf", "k1"), ("other", "k1"), ("nope", "k0")]
        )
        assert await tx.runs.find_by_keys([]) == {}
        assert [r.id for r in await tx.runs.claim_pending(10)] == [
            f"r{i}" for i in range(5, -1, -1)
        ]
    assert got == runs
    # ("wf", "k1") belongs to r3, which has no key: not found.
    assert found == {("other", "k0"): runs[0], ("wf", "k2"): runs[5], ("other", "k1"): runs[2]}


@pytest.mark.parametrize(
    "clash",
    [
        pytest.param(make_run("r1", idempotency_key="fresh"), id="stored-id"),
        pytest.param(make_run("r9", idempotency_key="k"), id="stored-key"),
        pytest.param(make_run("r2", idempotency_key="other"), id="repeated-id"),
        pytest.param(make_run("r8", idempotency_key="k2"), id="repeated-key"),
    ],
)
async def test_insert_runs_with_a_duplicate_raises_naming_it_and_rolls_back(
    backend: Any, clash: Run
) -> None:
    """An id or a (workflow, key) that is stored already or repeats within the call raises
    ``DuplicateError`` naming the run; the transaction then writes nothing of the call."""
    await seed(backend, make_run("r1", idempotency_key="k"))
    batch = [make_run("r2", idempotency_key="k2", priority=7), make_run("r3"), clash]
    with pytest.raises(DuplicateError, match=repr(clash.id)):
        async with backend.persistence.transaction() as tx:
            await tx.runs.insert_many(batch)
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is None
        assert await tx.runs.get("r3") is None
        assert await tx.runs.find_by_keys([("wf", "k2"), ("wf", "fresh")]) == {}
        stored = await tx.runs.get("r1")
        assert [r.id for r in await tx.runs.claim_pending(10)] == ["r1"]
    assert stored is not None
    assert stored.idempotency_key == "k"


async def test_stages_of_runs_inserted_in_the_same_transaction(backend: Any) -> None:
    """Stages added to runs the same transaction inserted (as ``run.create`` does) keep
    their order across calls, and a repeated stage id is still a duplicate."""
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert_many([make_run("r1"), make_run("r2")])
        await tx.runs.insert(make_run("r3"))
        await tx.stages.insert_many(
            [make_stage("r1", "b", 1), make_stage("r2", "a"), make_stage("r1", "a")]
        )
        await tx.stages.insert_many([make_stage("r1", "c", 1), make_stage("r3", "a")])
        with pytest.raises(DuplicateError, match="'b'"):
            await tx.stages.insert_many([make_stage("r1", "b", 2)])
    async with backend.persistence.transaction() as tx:
        assert await tx.stages.for_run("r1") == [
            make_stage("r1", "a"),
            make_stage("r1", "b", 1),
            make_stage("r1", "c", 1),
        ]
        assert [s.stage_id for s in await tx.stages.for_run("r2")] == ["a"]
        assert [s.stage_id for s in await tx.stages.for_run("r3")] == ["a"]
        await tx.stages.insert_many([make_stage("r1", "d", 1)])
    async with backend.persistence.transaction() as tx:
        assert [s.stage_id for s in await tx.stages.for_run("r1")] == ["a", "b", "c", "d"]


async def test_update_run_bumps_the_version(backend: Any) -> None:
    """``update_run`` stores the change and returns the run with ``version + 1``."""
    await seed(backend, make_run("r1"))
    async with backend.persistence.transaction() as tx:
        run = await tx.runs.get("r1", for_update=True)
        assert run is not None
        new = await tx.runs.update(
            evolve(run, {"status": RunStatus.RUNNING, "started_at": at(5), "updated_at": at(5)})
        )
    assert new.version == run.version + 1
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got == new
    assert got.status is RunStatus.RUNNING


async def test_update_run_with_a_stale_version_raises_concurrency_error(backend: Any) -> None:
    """A writer holding an old version loses: ``ConcurrencyError``, and the winner's data stays."""
    await seed(backend, make_run("r1"))
    async with backend.persistence.transaction() as tx:
        stale = await tx.runs.get("r1")
        assert stale is not None
        await tx.runs.update(evolve(stale, {"priority": 8}))
    with pytest.raises(ConcurrencyError, match="r1"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.update(evolve(stale, {"priority": 1}))
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get("r1")
    assert got is not None
    assert (got.priority, got.version) == (8, 1)


async def test_update_of_a_missing_run_raises_concurrency_error(backend: Any) -> None:
    """Updating a run that does not exist is a ``ConcurrencyError`` (it was deleted)."""
    with pytest.raises(ConcurrencyError, match="ghost"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.update(make_run("ghost"))


async def _list_ids(backend: Any, **filter_fields: Any) -> list[str]:
    async with backend.persistence.transaction() as tx:
        return [r.id for r in await tx.runs.query(RunFilter(**filter_fields))]


async def test_list_runs_filters_and_orders_newest_first(backend: Any) -> None:
    """Every ``RunFilter`` field narrows the result; order is newest first, ties by id desc."""
    await seed(
        backend,
        make_run("a", created_at=at(0), status=RunStatus.COMPLETED),
        make_run("b", created_at=at(10), workflow_id="other"),
        make_run("c", created_at=at(10), parent_run_id="a", search_attributes={"k": "x"}),
        make_run("d", created_at=at(20), status=RunStatus.COMPLETED, search_attributes={"k": "y"}),
        make_run("e", created_at=at(30), search_attributes={"k": "x", "n": 2}),
    )
    assert await _list_ids(backend) == ["e", "d", "c", "b", "a"]
    assert await _list_ids(backend, status=RunStatus.COMPLETED) == ["d", "a"]
    any_of = frozenset({RunStatus.COMPLETED, RunStatus.PENDING})
    assert await _list_ids(backend, statuses=any_of) == ["e", "d", "c", "b", "a"]
    assert await _list_ids(backend, statuses=frozenset({RunStatus.FAILED})) == []
    assert await _list_ids(backend, statuses=any_of, workflow_id="other") == ["b"]
    assert await _list_ids(backend, workflow_id="other") == ["b"]
    assert await _list_ids(backend, created_after=at(10)) == ["e", "d", "c", "b"]
    assert await _list_ids(backend, created_before=at(20)) == ["c", "b", "a"]
    assert await _list_ids(backend, created_after=at(10), created_before=at(30)) == ["d", "c", "b"]
    assert await _list_ids(backend, parent_run_id="a") == ["c"]
    assert await _list_ids(backend, attributes={"k": "x"}) == ["e", "c"]
    assert await _list_ids(backend, attributes={"k": "x", "n": 2}) == ["e"]
    assert await _list_ids(backend, attributes={"missing": None}) == []
    assert await _list_ids(backend, status=RunStatus.PENDING, workflow_id="wf") == ["e", "c"]


async def test_list_runs_attribute_filters_compare_json_values_exactly(backend: Any) -> None:
    """Attribute filters match JSON values by type: ``1`` is not ``True``, ``"1"`` is not ``1``,
    ``None`` matches only a stored null, and objects compare by content."""
    await seed(
        backend,
        make_run("int", search_attributes={"v": 1}),
        make_run("bool", search_attributes={"v": True}),
        make_run("str", search_attributes={"v": "1"}),
        make_run("null", search_attributes={"v": None}),
        make_run("obj", search_attributes={"v": {"a": 1, "b": [1, 2]}}),
        make_run("none"),
    )
    assert await _list_ids(backend, attributes={"v": 1}) == ["int"]
    assert await _list_ids(backend, attributes={"v": True}) == ["bool"]
    assert await _list_ids(backend, attributes={"v": "1"}) == ["str"]
    assert await _list_ids(backend, attributes={"v": None}) == ["null"]
    assert await _list_ids(backend, attributes={"v": {"b": [1, 2], "a": 1}}) == ["obj"]
    assert await _list_ids(backend, attributes={"v": {"a": 1}}) == []
    assert await _list_ids(backend, attributes={"v": {"a": True, "b": [1, 2]}}) == []
    assert await _list_ids(backend, attributes={"v": {"a": 1, "b": [2, 1]}}) == []
    assert await _list_ids(backend, attributes={"v": 1.0}) == ["int"]


async def test_list_runs_attribute_filters_combine_keys_and_odd_names(backend: Any) -> None:
    """Several keys filter together (scalars and objects mixed, as PostgreSQL's containment
    test plus exact comparison does it), stored floats match integral filters, and key
    names with dots, spaces and non-ASCII letters are plain keys on every adapter (keys
    with a double quote are refused before they reach persistence)."""
    await seed(
        backend,
        make_run("a", search_attributes={"k.x": "1", "qé t": 2.0, "sp ace": {"a": [1]}}),
        make_run("b", search_attributes={"k.x": "1", "qé t": 2, "sp ace": {"a": [1, 1]}}),
        make_run("c", search_attributes={"k": {"x": "1"}, "qé t": 3}),
    )
    assert await _list_ids(backend, attributes={"k.x": "1"}) == ["b", "a"]
    assert await _list_ids(backend, attributes={"qé t": 2}) == ["b", "a"]
    assert await _list_ids(backend, attributes={"k.x": "1", "sp ace": {"a": [1]}}) == ["a"]
    assert await _list_ids(backend, attributes={"qé t": 2, "sp ace": {"a": [1, 1]}}) == ["b"]
    assert await _list_ids(backend, attributes={"k": {"x": "1"}, "qé t": 2}) == []
    assert await _list_ids(backend, attributes={"k": {"x": "1"}}) == ["c"]
    async with backend.persistence.transaction() as tx:
        counts = await tx.runs.count("status", RunFilter(attributes={"k.x": "1", "qé t": 2.0}))
    assert counts == {"PENDING": 2}


async def test_list_runs_paginates_with_limit_and_offset(backend: Any) -> None:
    """``limit``/``offset`` walk the newest-first list in pages without overlap or gaps."""
    await seed(backend, *(make_run(f"r{i}", created_at=at(i)) for i in range(7)))
    pages = [await _list_ids(backend, limit=3, offset=o) for o in (0, 3, 6, 9)]
    assert pages == [["r6", "r5", "r4"], ["r3", "r2", "r1"], ["r0"], []]


async def test_count_runs_groups_by_status_or_workflow(backend: Any) -> None:
    """``count_runs`` counts the filtered runs per status or per workflow id."""
    await seed(
        backend,
        make_run("a", status=RunStatus.COMPLETED),
        make_run("b", status=RunStatus.COMPLETED, workflow_id="other"),
        make_run("c", status=RunStatus.FAILED, created_at=at(10)),
        make_run("d", created_at=at(10)),
    )
    async with backend.persistence.transaction() as tx:
        by_status = await tx.runs.count("status", RunFilter())
        by_workflow = await tx.runs.count("workflow_id", RunFilter())
        recent = await tx.runs.count("status", RunFilter(created_after=at(10)))
        empty = await tx.runs.count("status", RunFilter(workflow_id="none"))
        settled = await tx.runs.count(
            "status", RunFilter(statuses=frozenset({RunStatus.COMPLETED, RunStatus.FAILED}))
        )
        with pytest.raises(ValueError, match="priority"):
            await tx.runs.count("priority", RunFilter())
    assert by_status == {"COMPLETED": 2, "FAILED": 1, "PENDING": 1}
    assert by_workflow == {"wf": 3, "other": 1}
    assert recent == {"FAILED": 1, "PENDING": 1}
    assert settled == {"COMPLETED": 2, "FAILED": 1}
    assert empty == {}


async def test_claim_pending_runs_orders_by_priority_then_fifo(backend: Any) -> None:
    """Only PENDING runs are claimed, highest priority first, then oldest first, up to limit."""
    await seed(
        backend,
        make_run("low", priority=1, created_at=at(0)),
        make_run("high-late", priority=9, created_at=at(20)),
        make_run("mid", priority=5, created_at=at(5)),
        make_run("high-early", priority=9, created_at=at(10)),
        make_run("running", priority=10, status=RunStatus.RUNNING),
        make_run("done", priority=10, status=RunStatus.COMPLETED),
    )
    async with backend.persistence.transaction() as tx:
        claimed = [r.id for r in await tx.runs.claim_pending(10)]
        first_two = [r.id for r in await tx.runs.claim_pending(2)]
    assert claimed == ["high-early", "high-late", "mid", "low"]
    assert first_two == ["high-early", "high-late"]


async def test_runs_inactive_since_selects_by_status_and_updated_at(backend: Any) -> None:
    """Runs in the status not updated since the cutoff (exclusive) come back oldest first."""
    await seed(
        backend,
        make_run("old", status=RunStatus.RUNNING, updated_at=at(10)),
        make_run("older", status=RunStatus.RUNNING, updated_at=at(5)),
        make_run("at-cutoff", status=RunStatus.RUNNING, updated_at=at(30)),
        make_run("fresh", status=RunStatus.RUNNING, updated_at=at(40)),
        make_run("other-status", status=RunStatus.SUSPENDED, updated_at=at(0)),
    )
    async with backend.persistence.transaction() as tx:
        stuck = [r.id for r in await tx.runs.inactive_since(RunStatus.RUNNING, at(30), 10)]
        one = [r.id for r in await tx.runs.inactive_since(RunStatus.RUNNING, at(30), 1)]
    assert stuck == ["older", "old"]
    assert one == ["older"]


# -- stages ---------------------------------------------------------------------------


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


async def test_due_timers_of_one_purpose_across_runs(backend: Any) -> None:
    """Unfired timers of the asked purpose due at ``now`` come back across runs, earliest
    first and up to ``limit``; a fired timer or another purpose is never due."""
    from treadle.kernel.workflows.model import Timer

    await seed(backend, make_run("r1"), make_run("r2"))

    def timer(run_id: str, name: str, seconds: float, purpose: str) -> Timer:
        return Timer(
            workflow_run_id=run_id,
            name=name,
            occurrence=0,
            purpose=purpose,
            fire_at=at(seconds),
            created_at=T0,
        )

    async with backend.persistence.transaction() as tx:
        await tx.timers.schedule(timer("r1", "deadline", 10, "execution_timeout"))
        await tx.timers.schedule(timer("r2", "deadline", 5, "execution_timeout"))
        await tx.timers.schedule(timer("r2", "later", 50, "execution_timeout"))
        await tx.timers.schedule(timer("r1", "nap", 1, "sleep"))
    async with backend.persistence.transaction() as tx:
        due = await tx.timers.due(at(10), 10, purpose="execution_timeout")
        first = await tx.timers.due(at(10), 1, purpose="execution_timeout")
        assert await tx.timers.fire("r2", "deadline", 0, at(11))
    assert [(t.workflow_run_id, t.name, t.fire_at) for t in due] == [
        ("r2", "deadline", at(5)),
        ("r1", "deadline", at(10)),
    ]
    assert [t.workflow_run_id for t in first] == ["r2"]
    assert_utc(due[0].fire_at)
    async with backend.persistence.transaction() as tx:
        after = await tx.timers.due(at(100), 10, purpose="execution_timeout")
    assert [(t.workflow_run_id, t.name) for t in after] == [("r1", "deadline"), ("r2", "later")]


# -- outbox ---------------------------------------------------------------------------


def every_event(run_id: str) -> list[EventBase]:
    """One of each event type, every optional field set."""
    base: dict[str, Any] = {"workflow_run_id": run_id, "causation_id": "cmd-1"}
    return [
        WorkflowCreated(**base, timestamp=at(0), workflow_id="wf", priority=7),
        WorkflowStarted(
            **base, timestamp=at(1), workflow_id="wf", worker_id="w", rerun_from_stage_id="s"
        ),
        WorkflowSuspended(**base, timestamp=at(2), waiting_for="signal approval"),
        WorkflowCompleted(
            **base, timestamp=at(3), output={"a": [1, None]}, duration=timedelta(seconds=1.5)
        ),
        WorkflowFailed(
            **base, timestamp=at(4), error="e", stage_id="s", duration=timedelta(microseconds=1)
        ),
        WorkflowCancelled(**base, timestamp=at(5), reason="user"),
        StageStarted(**base, timestamp=at(6), stage_id="s", attempt=1, worker_id="w"),
        StageProgress(**base, timestamp=at(7), stage_id="s", fraction=0.25, message="quarter"),
        StageSuspended(**base, timestamp=at(8), stage_id="s", next_poll_at=at(68.000001)),
        StageCompleted(
            **base,
            timestamp=at(9),
            stage_id="s",
            attempt=2,
            output="text",
            duration=timedelta(days=1, microseconds=3),
        ),
        StageFailed(
            **base,
            timestamp=at(10),
            stage_id="s",
            attempt=1,
            error="x",
            will_retry=True,
            retry_at=at(12.5),
            traceback=TRACEBACK,
        ),
        SignalReceived(**base, timestamp=at(11), name="approval", payload={"ok": True}),
        ReviewRequested(
            **base, timestamp=at(12), review_id="rv", review_type="legal", reviewers=["a", "b"]
        ),
        ReviewDecided(**base, timestamp=at(13), review_id="rv", decision="approved", reviewer="a"),
        AnnotationCreated(
            **base,
            timestamp=at(14),
            annotation_id="an",
            attributes={"k": 1},
            actor="me",
            scope="s",
            stage_id="s",
        ),
        SagaCompensated(
            **base,
            timestamp=at(15),
            trigger="cancelled",
            compensated=["refund", "release#2"],
            failed={"notify": "ValueError: down"},
        ),
        ChildStarted(
            **base, timestamp=at(16), child_run_id="r1.child-0", child_workflow_id="w", occurrence=1
        ),
        ChildFinished(
            **base,
            timestamp=at(17),
            child_run_id="r1.child-0",
            child_workflow_id="w",
            status="FAILED",
            error="boom",
        ),
    ]


async def test_events_read_back_as_the_same_typed_models(backend: Any) -> None:
    """``events_for_run`` returns events equal to those written (type, fields, aware times)."""
    await seed(backend, make_run("r1"))
    written = every_event("r1")
    async with backend.persistence.transaction() as tx:
        stored = await tx.outbox.append(written)
    assert [e.sequence for e in stored] == list(range(1, len(written) + 1))
    assert stored == [e.model_copy(update={"sequence": i + 1}) for i, e in enumerate(written)]
    async with backend.persistence.transaction() as tx:
        read = await tx.outbox.events_for_run("r1")
        later = await tx.outbox.events_for_run("r1", after_sequence=13)
    assert read == stored
    assert [type(e) for e in read] == [type(e) for e in written]
    for event in read:
        assert_utc(event.timestamp)
    assert later == stored[13:]


async def test_event_sequences_are_gap_free_per_run(backend: Any) -> None:
    """Each run numbers its events 1, 2, 3... across transactions, interleaved with other
    runs, and a rolled-back append gives its numbers back."""
    async with backend.persistence.transaction() as tx:
        first = await tx.outbox.append([created("a"), created("b"), created("a")])
    with pytest.raises(BoomError):
        await fail_after(backend, lambda tx: tx.outbox.append([created("a"), created("b")]))
    async with backend.persistence.transaction() as tx:
        second = await tx.outbox.append([created("b"), created("a"), created("c")])
    assert [(e.workflow_run_id, e.sequence) for e in first + second] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 3),
        ("c", 1),
    ]
    async with backend.persistence.transaction() as tx:
        assert [e.sequence for e in await tx.outbox.events_for_run("a")] == [1, 2, 3]
        assert [e.sequence for e in await tx.outbox.events_for_run("b")] == [1, 2]
        assert await tx.outbox.append([]) == []


async def test_unpublished_events_come_oldest_first(backend: Any) -> None:
    """The unpublished outbox is returned in append order (per-run order kept), up to limit."""
    async with backend.persistence.transaction() as tx:
        await tx.outbox.append([created("a", 0), created("b", 1), created("a", 2)])
    async with backend.persistence.transaction() as tx:
        await tx.outbox.append([created("b", 3)])
    async with backend.persistence.transaction() as tx:
        records = await tx.outbox.unpublished(10)
        two = await tx.outbox.unpublished(2)
    assert [(r.event.workflow_run_id, r.event.sequence) for r in records] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
    ]
    ids = [r.id for r in records]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert [r.id for r in two] == ids[:2]
    record = records[0]
    assert (record.attempts, record.published, record.dead_lettered, record.last_error) == (
        0,
        False,
        False,
        None,
    )
    assert isinstance(record.event, WorkflowCreated)


async def test_mark_published_removes_events_from_the_outbox_only(backend: Any) -> None:
    """Published rows leave the unpublished list, but the run's event history keeps them."""
    async with backend.persistence.transaction() as tx:
        await tx.outbox.append([created("a"), created("a"), created("a")])
    async with backend.persistence.transaction() as tx:
        records = await tx.outbox.unpublished(10)
        await tx.outbox.mark_published([records[0].id, records[1].id])
        await tx.outbox.mark_published([])
    async with backend.persistence.transaction() as tx:
        left = await tx.outbox.unpublished(10)
        history = await tx.outbox.events_for_run("a")
    assert [r.id for r in left] == [records[2].id]
    assert [e.sequence for e in history] == [1, 2, 3]


async def test_mark_published_is_idempotent(backend: Any) -> None:
    """Marking rows published again, or ids that do not exist, is a no-op: two flushers that
    race, or a replay of an already published event, do not fail."""
    async with backend.persistence.transaction() as tx:
        await tx.outbox.append([created("a"), created("a")])
    async with backend.persistence.transaction() as tx:
        first, second = await tx.outbox.unpublished(10)
        await tx.outbox.mark_published([first.id])
    async with backend.persistence.transaction() as tx:
        await tx.outbox.mark_published([first.id, 999_999])
    async with backend.persistence.transaction() as tx:
        assert [r.id for r in await tx.outbox.unpublished(10)] == [second.id]
        assert [e.sequence for e in await tx.outbox.events_for_run("a")] == [1, 2]


async def test_publish_failures_count_then_dead_letter(backend: Any) -> None:
    """A failure bumps attempts and keeps the row unpublished; a dead-lettered row leaves the
    outbox for the DLQ, and publishing it (replay) takes it out of the DLQ."""
    async with backend.persistence.transaction() as tx:
        await tx.outbox.append([created("a"), created("b"), created("c")])
    async with backend.persistence.transaction() as tx:
        a, b, c = await tx.outbox.unpublished(10)
        await tx.outbox.record_failure(a.id, "sink down", dead_letter=False)
        await tx.outbox.record_failure(b.id, "first", dead_letter=False)
        await tx.outbox.record_failure(b.id, "gave up", dead_letter=True)
        await tx.outbox.record_failure(c.id, "gave up too", dead_letter=True)
    async with backend.persistence.transaction() as tx:
        pending = await tx.outbox.unpublished(10)
        dead = await tx.outbox.dead_lettered(10)
        dead_one = await tx.outbox.dead_lettered(1)
    assert [(r.id, r.attempts, r.last_error, r.dead_lettered) for r in pending] == [
        (a.id, 1, "sink down", False)
    ]
    assert [(r.id, r.attempts, r.last_error, r.dead_lettered) for r in dead] == [
        (b.id, 2, "gave up", True),
        (c.id, 1, "gave up too", True),
    ]
    assert dead[0].event == b.event
    assert [r.id for r in dead_one] == [b.id]
    async with backend.persistence.transaction() as tx:
        await tx.outbox.mark_published([b.id])
    async with backend.persistence.transaction() as tx:
        assert [r.id for r in await tx.outbox.dead_lettered(10)] == [c.id]
        assert [r.id for r in await tx.outbox.unpublished(10)] == [a.id]


async def test_requeued_dead_letters_are_pending_again_in_outbox_order(backend: Any) -> None:
    """requeue_dead_letters puts dead rows back with attempts 0 (a fresh retry budget):
    the next read of the outbox returns them in outbox order, before a run's later events
    still waiting there. Rows not dead-lettered are skipped and not counted; a rollback
    leaves them dead."""
    async with backend.persistence.transaction() as tx:
        await tx.outbox.append([created("a"), created("a"), created("b"), created("a")])
    async with backend.persistence.transaction() as tx:
        a1, a2, b1, a3 = await tx.outbox.unpublished(10)
        await tx.outbox.mark_published([a1.id])
        for _ in range(3):
            await tx.outbox.record_failure(a2.id, "sink down", dead_letter=False)
        await tx.outbox.record_failure(a2.id, "gave up", dead_letter=True)
        await tx.outbox.record_failure(b1.id, "gave up", dead_letter=True)

    async def requeue_a2(tx: Any) -> None:
        assert await tx.outbox.requeue_dead_letters([a2.id]) == 1

    with pytest.raises(BoomError):
        await fail_after(backend, requeue_a2)
    async with backend.persistence.transaction() as tx:
        assert [r.id for r in await tx.outbox.dead_lettered(10)] == [a2.id, b1.id]
        assert [r.id for r in await tx.outbox.unpublished(10)] == [a3.id]
        assert await tx.outbox.requeue_dead_letters([]) == 0
        # a1 is published, a3 pending, 999_999 unknown: only the dead rows count.
        assert await tx.outbox.requeue_dead_letters([b1.id, a1.id, a3.id, a2.id, 999_999]) == 2
    async with backend.persistence.transaction() as tx:
        pending = await tx.outbox.unpublished(10)
        assert await tx.outbox.dead_lettered(10) == []
        assert await tx.outbox.requeue_dead_letters([a2.id]) == 0  # pending again, not dead
    assert [(r.id, r.attempts, r.dead_lettered, r.published) for r in pending] == [
        (a2.id, 0, False, False),
        (b1.id, 0, False, False),
        (a3.id, 0, False, False),
    ]
    assert [(r.event.workflow_run_id, r.event.sequence) for r in pending] == [
        ("a", 2),
        ("b", 1),
        ("a", 3),
    ]


# -- idempotency ------------------------------------------------------------------------


async def test_idempotency_records_put_get_replace_delete(backend: Any) -> None:
    """Records are keyed by (key, command type); put replaces, delete removes (idempotently)."""
    started = IdempotencyRecord(
        key="k", command_type="run.create", state=IdempotencyState.IN_PROGRESS, started_at=at(1)
    )
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put(started)
        assert await tx.idempotency.get("k", "run.create") == started
    done = started.model_copy(
        update={
            "state": IdempotencyState.COMPLETED,
            "result": {"workflow_run_id": "r1", "nested": [1, {"a": None}]},
            "started_at": at(2),
        }
    )
    other = started.model_copy(update={"command_type": "run.cancel"})
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put(done)
        await tx.idempotency.put(other)
    async with backend.persistence.transaction() as tx:
        got = await tx.idempotency.get("k", "run.create")
        assert got == done
        assert_utc(got.started_at if got else None)
        assert await tx.idempotency.get("k", "run.cancel") == other
        assert await tx.idempotency.get("k", "run.transition") is None
        await tx.idempotency.delete("k", "run.create")
        await tx.idempotency.delete("k", "never-there")
    async with backend.persistence.transaction() as tx:
        assert await tx.idempotency.get("k", "run.create") is None
        assert await tx.idempotency.get("k", "run.cancel") == other


# -- logs and annotations -------------------------------------------------------------------


async def test_logs_append_and_read_in_order(backend: Any) -> None:
    """Logs come back per run in append order, fields and timestamps intact."""
    logs = [
        LogRecord(
            workflow_run_id="r1",
            stage_id="s",
            level="info",
            message="one",
            fields={"n": 1, "tags": ["a"]},
            timestamp=at(1.000001),
        ),
        LogRecord(
            workflow_run_id="r2", stage_id=None, level="warning", message="x", timestamp=at(2)
        ),
        LogRecord(
            workflow_run_id="r1", stage_id=None, level="error", message="two", timestamp=at(0)
        ),
    ]
    async with backend.persistence.transaction() as tx:
        await tx.logs.append(logs[:2])
        await tx.logs.append([])
    async with backend.persistence.transaction() as tx:
        await tx.logs.append(logs[2:])
    async with backend.persistence.transaction() as tx:
        r1 = await tx.logs.for_run("r1")
        assert await tx.logs.for_run("r2") == [logs[1]]
        assert await tx.logs.for_run("none") == []
    assert r1 == [logs[0], logs[2]]
    assert_utc(r1[0].timestamp)


def annotation(ann_id: str, run_id: str = "r1", **fields: Any) -> Annotation:
    fields.setdefault("attributes", {})
    return Annotation(id=ann_id, workflow_run_id=run_id, created_at=at(len(ann_id)), **fields)


async def test_annotations_round_trip_and_list_filters(backend: Any) -> None:
    """Annotations list in insertion order, narrowed by key, key prefix, scope and limit."""
    items = [
        annotation("a1", attributes={"env.region": "eu", "owner": "x"}, scope="deploy", actor="ci"),
        annotation("a2", attributes={"Env.Upper": 1}, scope="review", stage_id="s"),
        annotation("a3", attributes={"owner": "y"}, idempotency_key="once"),
        annotation("a4", attributes={"env.zone": "b"}, scope="deploy"),
        annotation("b1", run_id="r2", attributes={"owner": "z"}),
    ]
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many(items[:2])
        await tx.annotations.insert_many([])
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many(items[2:])

    async def ids(**kw: Any) -> list[str]:
        async with backend.persistence.transaction() as tx:
            return [a.id for a in await tx.annotations.for_run("r1", **kw)]

    async with backend.persistence.transaction() as tx:
        assert await tx.annotations.for_run("r1") == items[:4]
        assert await tx.annotations.find("r1", "once") == items[2]
        assert await tx.annotations.find("r2", "once") is None
    assert await ids(key="owner") == ["a1", "a3"]
    assert await ids(key_prefix="env.") == ["a1", "a4"]
    assert await ids(key_prefix="Env.") == ["a2"]
    assert await ids(scope="deploy") == ["a1", "a4"]
    assert await ids(scope="deploy", key="owner") == ["a1"]
    assert await ids(limit=2) == ["a1", "a2"]
    assert await ids(key="owner", limit=1) == ["a1"]
    assert await ids(key="nope") == []


async def test_annotation_idempotency_key_is_unique_per_run(backend: Any) -> None:
    """A second annotation with a used key on the same run raises ``DuplicateError``; another
    run may use the key."""
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many([annotation("a1", idempotency_key="k")])
    with pytest.raises(DuplicateError, match="'k'"):
        async with backend.persistence.transaction() as tx:
            await tx.annotations.insert_many([annotation("a2", idempotency_key="k")])
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many([annotation("b1", run_id="r2", idempotency_key="k")])
        assert [a.id for a in await tx.annotations.for_run("r1")] == ["a1"]


# -- set-oriented forms (group commit) -------------------------------------------------
# Several commands' reads and writes in one transaction: each form equals the single-row
# method applied to every item, and a failing item leaves nothing of the call behind once
# the transaction has rolled back.


async def test_get_runs_returns_the_found_runs_by_id(backend: Any) -> None:
    """Missing ids are absent, repeated ids harmless; each run equals ``get_run``'s, locked
    or not."""
    await seed(backend, make_run("r1", priority=3), make_run("r2", input={"n": [1, 2]}))
    async with backend.persistence.transaction() as tx:
        single = {run_id: await tx.runs.get(run_id) for run_id in ("r1", "r2")}
        found = await tx.runs.get_many(["r2", "missing", "r1", "r2"])
        locked = await tx.runs.get_many(["r1", "r2"], for_update=True)
        assert await tx.runs.get_many([]) == {}
        assert await tx.runs.get_many(["missing"], for_update=True) == {}
    assert found == single
    assert locked == single
    assert all(run.stages == [] for run in found.values())


async def test_get_runs_for_update_serialises_read_modify_write(backend: Any) -> None:
    """Concurrent transactions that lock overlapping sets of runs (named in either order)
    before updating them never see a stale version and never deadlock."""
    await seed(backend, make_run("a", priority=0), make_run("b", priority=0))

    async def bump(order: list[str]) -> None:
        async with backend.persistence.transaction() as tx:
            runs = await tx.runs.get_many(order, for_update=True)
            await tx.runs.update_many(
                [evolve(runs[i], {"priority": runs[i].priority + 1}) for i in order]
            )

    await asyncio.gather(*(bump(["a", "b"] if n % 2 else ["b", "a"]) for n in range(6)))
    async with backend.persistence.transaction() as tx:
        final = await tx.runs.get_many(["a", "b"])
    assert [(r.priority, r.version) for r in (final["a"], final["b"])] == [(6, 6), (6, 6)]


async def test_update_runs_stores_each_and_bumps_versions_in_order(backend: Any) -> None:
    await seed(backend, make_run("r1"), make_run("r2"))
    async with backend.persistence.transaction() as tx:
        runs = await tx.runs.get_many(["r1", "r2"])
        changed = [
            evolve(runs["r2"], {"status": RunStatus.RUNNING, "updated_at": at(2)}),
            evolve(runs["r1"], {"output": {"done": [1, None]}, "current_group": 3}),
        ]
        new = await tx.runs.update_many(changed)
        assert await tx.runs.update_many([]) == []
    assert new == [evolve(r, {"version": 1, "stages": []}) for r in changed]
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get_many(["r1", "r2"]) == {"r1": new[1], "r2": new[0]}


async def test_update_runs_with_a_stale_or_missing_run_applies_nothing(backend: Any) -> None:
    """One stale (or missing) run fails the call with a ``ConcurrencyError`` naming it, and
    after the rollback none of the call's runs is changed; a run twice is a ``ValueError``."""
    await seed(backend, make_run("r1"), make_run("r2"))
    async with backend.persistence.transaction() as tx:
        old = await tx.runs.get_many(["r1", "r2"])
        winner = await tx.runs.update(evolve(old["r2"], {"priority": 9, "updated_at": at(1)}))
    fresh = old["r1"]
    # The run the call could write carries every kind of value, so telling it apart from
    # the stale one holds on every column type.
    change = {
        "status": RunStatus.RUNNING,
        "output": {"n": [1, 2.5, None, True], "s": "é"},
        "started_at": at(1.000001),
        "updated_at": at(2),
    }
    attempts = [
        ([evolve(fresh, change), evolve(old["r2"], {"priority": 1})], "'r2'"),
        ([make_run("ghost"), evolve(fresh, change)], "'ghost'"),
    ]
    for runs, named in attempts:
        with pytest.raises(ConcurrencyError, match=named) as raised:
            async with backend.persistence.transaction() as tx:
                await tx.runs.update_many(runs)
        assert "'r1'" not in str(raised.value)
    with pytest.raises(ValueError, match="r1"):
        async with backend.persistence.transaction() as tx:
            await tx.runs.update_many([fresh, evolve(fresh, {"priority": 2})])
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get_many(["r1", "r2", "ghost"]) == {"r1": fresh, "r2": winner}


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


async def test_put_idempotency_many_upserts_every_record(backend: Any) -> None:
    """As ``put_idempotency`` for each record in order: new keys inserted, existing ones
    replaced, and a key given twice keeps its last record."""
    base = IdempotencyRecord(
        key="k1", command_type="job.execute", state=IdempotencyState.IN_PROGRESS, started_at=T0
    )
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put(base)
    done = base.model_copy(
        update={"state": IdempotencyState.COMPLETED, "result": {"r": [1]}, "started_at": at(1)}
    )
    other = base.model_copy(update={"key": "k2", "result": "x"})
    first = base.model_copy(update={"key": "k3"})
    last = first.model_copy(update={"state": IdempotencyState.COMPLETED, "result": 3})
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put_many([done, other, first, last])
        await tx.idempotency.put_many([])
    async with backend.persistence.transaction() as tx:
        got = [await tx.idempotency.get(k, "job.execute") for k in ("k1", "k2", "k3")]
    assert got == [done, other, last]


async def test_concurrent_appends_for_overlapping_runs_stay_gap_free(backend: Any) -> None:
    """Transactions appending for several runs at once, listed in different orders, never
    deadlock and leave every run numbered 1..n without a gap or a repeat."""

    async def append(run_ids: list[str]) -> None:
        async with backend.persistence.transaction() as tx:
            await tx.outbox.append([created(run_id) for run_id in run_ids + run_ids[:1]])

    orders = [["a", "b", "c"], ["c", "b", "a"], ["b", "c"], ["c", "a"]] * 2
    await asyncio.gather(*(append(order) for order in orders))
    async with backend.persistence.transaction() as tx:
        counts = {r: [e.sequence for e in await tx.outbox.events_for_run(r)] for r in "abc"}
    for run_id, sequences in counts.items():
        assert sequences == list(range(1, len(sequences) + 1)), run_id
    appended = [r for order in orders for r in order + order[:1]]
    assert [len(counts[r]) for r in "abc"] == [appended.count(r) for r in "abc"]


# -- rollback ---------------------------------------------------------------------------


def make_job(job_id: str, run_id: str) -> Job:
    return Job(
        id=job_id,
        workflow_run_id=run_id,
        workflow_id="wf",
        stage_id="a",
        next_poll_at=T0,
        enqueued_at=T0,
    )


async def test_a_failed_transaction_leaves_nothing_behind(backend: Any) -> None:
    """An exception inside ``transaction()`` undoes every write: runs, stages, jobs, events,
    idempotency, logs, annotations, updates and deletes, and gives sequences back."""
    record = IdempotencyRecord(
        key="kept", command_type="run.create", state=IdempotencyState.COMPLETED, started_at=T0
    )
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(make_run("r1"))
        await tx.stages.insert_many([make_stage("r1", "a")])
        await tx.outbox.append([created("r1")])
        await tx.idempotency.put(record)
    p = backend.persistence

    async def writes(tx: Any) -> None:
        run = await tx.runs.get("r1")
        stage = await tx.stages.get("r1", "a")
        assert run is not None
        assert stage is not None
        await tx.runs.update(evolve(run, {"status": RunStatus.RUNNING}))
        await tx.stages.update(evolve(stage, {"status": StageStatus.RUNNING}))
        await tx.runs.insert(make_run("r2", idempotency_key="new"))
        await tx.runs.insert_many([make_run("r3", idempotency_key="many"), make_run("r4")])
        await tx.stages.insert_many([make_stage("r2", "a"), make_stage("r2", "b", 1)])
        await tx.stages.insert_many([make_stage("r3", "a"), make_stage("r4", "a")])
        await backend.job_transport.enqueue(tx, [make_job("j2", "r2")])
        await tx.outbox.append([created("r1"), created("r2"), created("r3")])
        await tx.idempotency.put(
            IdempotencyRecord(
                key="new", command_type="run.create", state="IN_PROGRESS", started_at=T0
            )
        )
        await tx.idempotency.delete("kept", "run.create")
        await tx.logs.append(
            [
                LogRecord(
                    workflow_run_id="r2", stage_id=None, level="info", message="m", timestamp=T0
                )
            ]
        )
        await tx.annotations.insert_many([annotation("an", run_id="r2", idempotency_key="x")])
        # Everything is visible inside the transaction before it fails.
        assert await tx.runs.get("r2") is not None
        assert await backend.job_transport.get(tx, "j2") is not None

    with pytest.raises(BoomError):
        await fail_after(backend, writes)
    async with p.transaction() as tx:
        assert await tx.runs.get("r2") is None
        assert await tx.runs.find_by_key("wf", "new") is None
        assert await tx.stages.for_run("r2") == []
        assert await tx.runs.get_many(["r3", "r4"]) == {}
        assert await tx.runs.find_by_keys([("wf", "many")]) == {}
        assert await tx.stages.for_runs(["r3", "r4"]) == {"r3": [], "r4": []}
        assert await tx.outbox.events_for_run("r3") == []
        assert await backend.job_transport.get(tx, "j2") is None
        assert await backend.job_transport.live_jobs(tx, "r2") == []
        assert await tx.outbox.events_for_run("r2") == []
        assert [e.sequence for e in await tx.outbox.events_for_run("r1")] == [1]
        assert len(await tx.outbox.unpublished(10)) == 1
        assert await tx.idempotency.get("new", "run.create") is None
        assert await tx.idempotency.get("kept", "run.create") == record
        assert await tx.logs.for_run("r2") == []
        assert await tx.annotations.for_run("r2") == []
        run = await tx.runs.get("r1")
        stage = await tx.stages.get("r1", "a")
        assert run is not None
        assert (run.status, run.version) == (RunStatus.PENDING, 0)
        assert stage is not None
        assert (stage.status, stage.version) == (StageStatus.PENDING, 0)
        assert await tx.runs.claim_pending(10) == [run]
    assert await backend.job_transport.dequeue("w", at(1)) == []
    assert await backend.job_transport.next_due_at() is None
    async with p.transaction() as tx:
        # The rolled-back ids and keys are free again.
        await tx.runs.insert(make_run("r2", idempotency_key="new"))
        await tx.runs.insert_many([make_run("r3", idempotency_key="many"), make_run("r4")])
        await tx.stages.insert_many([make_stage("r2", "a")])
        await backend.job_transport.enqueue(tx, [make_job("j2", "r2")])
        assert [e.sequence for e in await tx.outbox.append([created("r2")])] == [1]


async def test_an_uncaught_duplicate_rolls_back_the_whole_transaction(backend: Any) -> None:
    """A domain error escaping the transaction undoes the writes made before it."""
    await seed(backend, make_run("r1"))

    async def writes(tx: Any) -> None:
        await tx.runs.insert(make_run("r2"))
        await tx.outbox.append([created("r2")])
        await tx.runs.insert(make_run("r1"))

    with pytest.raises(DuplicateError):
        async with backend.persistence.transaction() as tx:
            await writes(tx)
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is None
        assert await tx.outbox.events_for_run("r2") == []


async def test_a_transaction_cannot_be_written_after_it_ended(backend: Any) -> None:
    """Writing through a finished transaction raises instead of silently auto-committing."""
    async with backend.persistence.transaction() as tx:
        pass
    with pytest.raises(TreadleError):
        await tx.runs.insert(make_run("late"))
    async with backend.persistence.transaction() as fresh:
        assert await fresh.runs.get("late") is None
