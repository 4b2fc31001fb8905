"""The outbox: ordered per-run publication, per-run fail-fast, retries, the DLQ and
plugin.replayDLQ, plus plugins as extra consumers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.deps import KernelSettings
from treadle.kernel.events import EventBase
from treadle.testing import CollectingEventSink, FakeClock, TestEngine


class In(BaseModel):
    n: int


@define_stage(id="a", input=In, output=In)
async def a(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


@define_stage(id="b", input=In, output=In)
async def b(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


WF = WorkflowBuilder("wf", input=In).pipe(a).pipe(b).build()
EXPECTED = [
    "workflow:created",
    "workflow:started",
    "stage:started",
    "stage:completed",
    "stage:started",
    "stage:completed",
    "workflow:completed",
]


EVERY_FLUSH = KernelSettings(outbox_retry_delay=timedelta(0))
"""No backoff: a failed event is tried again by the very next flush (these tests count
attempts per flush; the backoff has tests of its own below)."""


def _seqs(events: list[EventBase], run_id: str) -> list[int]:
    return [e.sequence for e in events if e.workflow_run_id == run_id]


async def test_events_published_in_per_run_order_with_gap_free_sequences() -> None:
    """Each run's events are published in order with sequences 1..n, none skipped."""
    te = TestEngine([WF])
    h1 = await te.start("wf", {"n": 1})
    h2 = await te.start("wf", {"n": 2})
    await te.run_until_idle()
    for handle in (h1, h2):
        assert te.event_sink.types(handle.run_id) == EXPECTED
        assert _seqs(te.events, handle.run_id) == list(range(1, len(EXPECTED) + 1))
        stored = await te.kernel.reads.events(handle.run_id)
        assert [e.sequence for e in stored] == _seqs(te.events, handle.run_id)
    started = [e for e in te.events if e.type == "stage:started"]  # type: ignore[attr-defined]
    assert all((e.causation_id or "").startswith("job:") for e in started)
    assert (await te.dispatch(c.OutboxFlush())).published == 0


async def test_events_are_not_published_before_flush() -> None:
    """Events commit to the outbox with the state change and reach the sink on flush."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    assert te.events == []
    result = await te.dispatch(c.OutboxFlush(max_events=100))
    assert result.published == 1
    assert te.event_sink.types(handle.run_id) == ["workflow:created"]


async def test_failing_run_blocks_only_itself_then_dead_letters_after_three_attempts() -> None:
    """A failing event stops its run's later events (fail-fast) but not other runs';
    after three failures it goes to the DLQ and the run's later events flow again."""
    te = TestEngine([WF], settings=EVERY_FLUSH)
    bad = await te.start("wf", {"n": 1})
    good = await te.start("wf", {"n": 2})
    poisoned = {"seq": 2}

    def fail_when(event: EventBase) -> bool:
        return event.workflow_run_id == bad.run_id and event.sequence == poisoned["seq"]

    await te.dispatch(c.RunClaimPending(worker_id="w"))
    await te.cancel(bad.run_id)  # bad run: created #1, started #2, cancelled #3
    te.event_sink.fail_when = fail_when

    first = await te.dispatch(c.OutboxFlush())
    assert (first.published, first.failed, first.dead_lettered) == (3, 1, 0)
    assert _seqs(te.events, bad.run_id) == [1]
    assert _seqs(te.events, good.run_id) == [1, 2]
    second = await te.dispatch(c.OutboxFlush())
    assert (second.published, second.failed, second.dead_lettered) == (0, 1, 0)
    third = await te.dispatch(c.OutboxFlush())
    assert (third.published, third.failed, third.dead_lettered) == (0, 1, 1)
    assert _seqs(te.events, bad.run_id) == [1]
    fourth = await te.dispatch(c.OutboxFlush())
    assert (fourth.published, fourth.failed) == (1, 0)
    assert _seqs(te.events, bad.run_id) == [1, 3]
    [dead] = await _dead(te)
    assert (dead.event.sequence, dead.attempts, dead.dead_lettered) == (2, 3, True)
    assert "ConnectionError" in (dead.last_error or "")

    te.event_sink.fail_when = None
    replay = await te.dispatch(c.PluginReplayDLQ())
    assert replay.replayed == 1
    assert await _dead(te) == []
    assert (await te.dispatch(c.PluginReplayDLQ())).replayed == 0
    assert (await te.dispatch(c.OutboxFlush())).published == 1
    assert _seqs(te.events, bad.run_id) == [1, 3, 2]


async def _dead(te: TestEngine) -> list[Any]:
    async with te.persistence.transaction() as tx:
        return await tx.outbox.dead_lettered(100)


async def test_a_replayed_event_that_fails_again_gets_a_fresh_retry_budget() -> None:
    """A replayed event whose publication fails again is retried by the next flushes
    and only then dead-lettered again: replay resets its attempts."""
    te = TestEngine([WF], settings=EVERY_FLUSH)
    await te.start("wf", {"n": 1})
    te.event_sink.fail_when = lambda event: True
    for _ in range(3):
        await te.dispatch(c.OutboxFlush())
    assert len(await _dead(te)) == 1
    assert (await te.dispatch(c.PluginReplayDLQ())).replayed == 1
    for dead_lettered in (0, 0, 1):
        flushed = await te.dispatch(c.OutboxFlush())
        assert (flushed.failed, flushed.dead_lettered) == (1, dead_lettered)
    [dead] = await _dead(te)
    assert dead.attempts == 3


async def test_flush_respects_max_events() -> None:
    """outbox.flush publishes at most max_events per call, oldest first."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    assert (await te.dispatch(c.OutboxFlush(max_events=1))).published == 1
    assert (await te.dispatch(c.OutboxFlush(max_events=1))).published == 1
    assert _seqs(te.events, handle.run_id) == [1, 2]


class Recorder:
    """A kernel plugin that records events, optionally failing on one type."""

    name = "recorder"

    def __init__(self, fail_type: str | None = None) -> None:
        self.fail_type = fail_type
        self.seen: list[str] = []

    async def on_event(self, event: EventBase) -> None:
        kind = event.type  # type: ignore[attr-defined]
        if kind == self.fail_type:
            raise RuntimeError("plugin down")
        self.seen.append(kind)


async def test_plugins_receive_published_events_and_their_failures_retry() -> None:
    """Plugins see every published event; a plugin failure counts as a publish failure."""
    plugin = Recorder(fail_type="workflow:completed")
    te = TestEngine([WF], plugins=[plugin], settings=EVERY_FLUSH)
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    assert plugin.seen == EXPECTED[:-1]
    assert len(await _dead(te)) == 1
    plugin.fail_type = None
    assert (await te.dispatch(c.PluginReplayDLQ())).replayed == 1
    assert (await te.dispatch(c.OutboxFlush())).published == 1
    assert plugin.seen[-1] == "workflow:completed"
    # The sink got workflow:completed on each attempt: at-least-once delivery.
    assert te.event_sink.types(handle.run_id).count("workflow:completed") == 4


async def test_the_flush_after_a_replay_publishes_the_replayed_events_in_run_order(
    url: str,
) -> None:
    """After plugin.replayDLQ reports replayed=N, the very next outbox.flush publishes
    those N events with a fresh retry budget, each run's in sequence order (before the
    run's later events still waiting); replay itself publishes nothing. On memory, a
    SQLite file and PostgreSQL."""
    sink = CollectingEventSink()
    async with await Engine.open(
        url, workflows=[WF], event_sink=sink, settings=EVERY_FLUSH
    ) as engine:
        kernel = engine.kernel
        bad = await engine.start("wf", {"n": 1})
        other = await engine.start("wf", {"n": 2})
        await kernel.dispatch(c.RunClaimPending(worker_id="w"))
        await engine.cancel(bad.run_id)  # bad run: created #1, started #2, cancelled #3
        await engine.cancel(other.run_id)  # the same for the other run
        sink.fail_when = lambda e: e.sequence == 2  # both runs' #2, three times: the DLQ
        for _ in range(3):
            await kernel.dispatch(c.OutboxFlush())
        assert _seqs(sink.events, bad.run_id) == _seqs(sink.events, other.run_id) == [1]
        async with engine.backend.persistence.transaction() as tx:  # type: ignore[union-attr]
            assert len(await tx.outbox.dead_lettered(10)) == 2
        sink.fail_when = None

        replay = await kernel.dispatch(c.PluginReplayDLQ())
        assert replay.replayed == 2
        assert _seqs(sink.events, bad.run_id) == [1]  # replay only puts them back
        flushed = await kernel.dispatch(c.OutboxFlush())
        assert (flushed.published, flushed.failed) == (4, 0)
        assert _seqs(sink.events, bad.run_id) == _seqs(sink.events, other.run_id) == [1, 2, 3]
        assert (await kernel.dispatch(c.OutboxFlush())).published == 0
        async with engine.backend.persistence.transaction() as tx:  # type: ignore[union-attr]
            assert await tx.outbox.dead_lettered(10) == []


async def test_a_failed_event_is_retried_after_an_exponential_backoff() -> None:
    """After a failure the event waits ``outbox_retry_delay`` (1 s by default), doubling
    per failure: flushes before then skip its run (the run's later events wait too,
    other runs flow), and the stored record says when it is due."""
    te = TestEngine([WF])
    bad = await te.start("wf", {"n": 1})
    te.event_sink.fail_when = lambda event: event.workflow_run_id == bad.run_id
    first = await te.dispatch(c.OutboxFlush())
    assert (first.published, first.failed) == (0, 1)
    [record] = [r for r in await _pending(te) if r.attempts]
    assert record.retry_at == te.clock.now() + timedelta(seconds=1)
    good = await te.start("wf", {"n": 2})
    waiting = await te.dispatch(c.OutboxFlush())
    assert (waiting.published, waiting.failed) == (1, 0)  # the other run is not held up
    assert _seqs(te.events, good.run_id) == [1]
    te.clock.advance(timedelta(seconds=1))
    second = await te.dispatch(c.OutboxFlush())
    assert (second.failed, second.dead_lettered) == (1, 0)
    [record] = [r for r in await _pending(te) if r.attempts]
    assert record.retry_at == te.clock.now() + timedelta(seconds=2)
    te.clock.advance(timedelta(seconds=1))
    assert (await te.dispatch(c.OutboxFlush())).failed == 0  # still backing off
    te.event_sink.fail_when = None
    te.clock.advance(timedelta(seconds=1))
    assert (await te.dispatch(c.OutboxFlush())).published == 1
    assert _seqs(te.events, bad.run_id) == [1]


async def test_the_backoff_is_capped_and_replay_makes_an_event_due_at_once() -> None:
    """The delay doubles up to ``outbox_retry_max_delay``; a dead letter put back by
    ``plugin.replayDLQ`` is due at once, not after its old backoff."""
    settings = KernelSettings(
        outbox_max_attempts=6,
        outbox_retry_delay=timedelta(seconds=10),
        outbox_retry_max_delay=timedelta(seconds=30),
    )
    te = TestEngine([WF], settings=settings)
    await te.start("wf", {"n": 1})
    te.event_sink.fail_when = lambda event: True
    delays = []
    for _ in range(6):
        before = te.clock.now()
        await te.dispatch(c.OutboxFlush())
        pending = [r for r in await _pending(te) if r.attempts]
        if pending:
            assert pending[0].retry_at is not None
            delays.append((pending[0].retry_at - before).total_seconds())
            te.clock.advance(pending[0].retry_at - before)
    assert delays == [10, 20, 30, 30, 30]
    [dead] = await _dead(te)
    assert dead.retry_at is None
    te.event_sink.fail_when = None
    assert (await te.dispatch(c.PluginReplayDLQ())).replayed == 1
    assert (await te.dispatch(c.OutboxFlush())).published == 1


async def _pending(te: TestEngine) -> list[Any]:
    async with te.persistence.transaction() as tx:
        return await tx.outbox.unpublished(100)


class BatchSink:
    """A sink that takes a flush's events in one call (as the webhook with batch=True)."""

    batches = True

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.down = False

    async def publish(self, event: EventBase) -> None:  # pragma: no cover - unused
        raise AssertionError("a batching sink gets publish_batch")

    async def publish_batch(self, events: list[EventBase]) -> None:
        if self.down:
            raise ConnectionError("receiver down")
        self.calls.append([(e.workflow_run_id, e.sequence) for e in events])


async def test_a_batching_sink_gets_each_flush_in_one_call_and_fails_per_run() -> None:
    """A sink with ``batches`` gets the flush's events in one call, each run's in order;
    when the call fails nothing is published and each run's first event records the
    failure (and backs off), so the next call after the backoff sends them all again."""
    sink = BatchSink()
    clock = FakeClock()
    async with await Engine.open(
        "memory://", workflows=[WF], event_sink=sink, clock=clock
    ) as engine:
        kernel = engine.kernel
        first = await engine.start("wf", {"n": 1})
        second = await engine.start("wf", {"n": 2})
        await kernel.dispatch(c.RunClaimPending(worker_id="w"))
        sink.down = True
        failed = await kernel.dispatch(c.OutboxFlush())
        assert (failed.published, failed.failed) == (0, 2)
        async with kernel.deps.persistence.transaction() as tx:
            pending = await tx.outbox.unpublished(100)
        attempts = {
            r.event.workflow_run_id: (r.event.sequence, r.attempts) for r in pending if r.attempts
        }
        assert attempts == {first.run_id: (1, 1), second.run_id: (1, 1)}
        sink.down = False
        assert (await kernel.dispatch(c.OutboxFlush())).published == 0  # both back off
        clock.advance(timedelta(seconds=1))
        assert (await kernel.dispatch(c.OutboxFlush())).published == 4
    (call,) = sink.calls
    for run_id in (first.run_id, second.run_id):
        assert [seq for rid, seq in call if rid == run_id] == [1, 2]
