"""Persistence contract, outbox (``tx.outbox``): typed events, gap-free per-run sequences,
publication, dead letters.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

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
from treadle.tests.contract.persistence.helpers import (
    TRACEBACK,
    BoomError,
    assert_utc,
    at,
    created,
    fail_after,
    make_run,
    seed,
)


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


async def test_event_feed_reads_every_run_in_outbox_order(backend: Any) -> None:
    """``events_after`` returns every run's events with their row ids, ascending, from a
    cursor and up to a limit, published or not; ``last_event_id`` is the newest id."""
    await seed(backend, make_run("r1"), make_run("r2"))
    async with backend.persistence.transaction() as tx:
        assert await tx.outbox.last_event_id() == 0
        assert await tx.outbox.events_after(0, 10) == []
    async with backend.persistence.transaction() as tx:
        first = await tx.outbox.append(every_event("r1")[:2])
    async with backend.persistence.transaction() as tx:
        second = await tx.outbox.append([every_event("r2")[0], every_event("r1")[6]])
    async with backend.persistence.transaction() as tx:
        feed = await tx.outbox.events_after(0, 100)
        last = await tx.outbox.last_event_id()
    assert [event for _, event in feed] == [*first, *second]
    ids = [outbox_id for outbox_id, _ in feed]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert last == ids[-1]
    async with backend.persistence.transaction() as tx:
        await tx.outbox.mark_published([ids[0]])
        assert await tx.outbox.events_after(ids[1], 1) == [feed[2]]
        assert await tx.outbox.events_after(0, 100) == feed  # published rows stay in the feed


async def test_event_watchers_hear_of_commits_not_rollbacks(backend: Any) -> None:
    """``watch_events`` callbacks run after a commit that appended events, and not for a
    rolled-back append or a transaction without events."""
    await seed(backend, make_run("r1"))
    told: list[int] = []
    stop = backend.persistence.watch_events(lambda: told.append(1))
    try:
        async with backend.persistence.transaction() as tx:
            await tx.outbox.append(every_event("r1")[:1])
        assert told == [1]

        async def append_then_fail() -> None:
            async with backend.persistence.transaction() as tx:
                await tx.outbox.append(every_event("r1")[1:2])
                raise BoomError

        with pytest.raises(BoomError):
            await append_then_fail()
        async with backend.persistence.transaction() as tx:
            await tx.outbox.events_for_run("r1")
        assert told == [1]
        async with backend.persistence.transaction() as tx:
            assert [e.sequence for _, e in await tx.outbox.events_after(0, 10)] == [1]
    finally:
        stop()
