"""Contracts of the small ports: EventSink (collecting and log sinks), Scheduler (memory and
the SQL table on SQLite and PostgreSQL) and Clock (system and fake)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from treadle.adapters.clock import SystemClock
from treadle.adapters.event_sinks import CollectingEventSink, LogEventSink
from treadle.adapters.memory import InMemoryScheduler
from treadle.kernel.events import StageCompleted, WorkflowCompleted, WorkflowCreated
from treadle.testing import FakeClock

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def created(run_id: str, sequence: int) -> WorkflowCreated:
    return WorkflowCreated(
        workflow_run_id=run_id, sequence=sequence, timestamp=T0, workflow_id="wf", priority=5
    )


# -- event sinks ------------------------------------------------------------------------


async def test_collecting_sink_keeps_events_in_publish_order() -> None:
    """Published events are kept as the same objects, in order, and can be read per run."""
    sink = CollectingEventSink()
    events = [created("a", 1), created("b", 1), created("a", 2)]
    for event in events:
        await sink.publish(event)
    assert sink.events == events
    assert sink.of_run("a") == [events[0], events[2]]
    assert sink.types("b") == ["workflow:created"]
    assert sink.types() == ["workflow:created"] * 3


async def test_collecting_sink_can_refuse_chosen_events() -> None:
    """With ``fail_when`` set, a matching publish raises (so the outbox retries) and records
    nothing; other events still go through."""
    sink = CollectingEventSink()
    sink.fail_when = lambda event: event.workflow_run_id == "bad"
    with pytest.raises(ConnectionError, match="workflow:created"):
        await sink.publish(created("bad", 1))
    await sink.publish(created("good", 1))
    assert [e.workflow_run_id for e in sink.events] == ["good"]


class RecordingLogger:
    """A structlog-shaped logger that records ``info`` calls."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


async def test_log_sink_writes_one_line_per_event_without_payloads() -> None:
    """Each event is one ``info`` line named by its type with run id and sequence; user
    payloads (outputs) stay out of logs unless asked for."""
    logger = RecordingLogger()
    sink = LogEventSink(logger)
    event = StageCompleted(
        workflow_run_id="r1",
        sequence=4,
        timestamp=T0,
        stage_id="s",
        attempt=1,
        output={"secret": "x"},
        duration=timedelta(seconds=2),
    )
    await sink.publish(event)
    ((name, fields),) = logger.lines
    assert name == "stage:completed"
    assert (fields["run_id"], fields["sequence"], fields["stage_id"]) == ("r1", 4, "s")
    assert "output" not in fields
    assert "secret" not in repr(fields)


async def test_log_sink_can_include_payloads() -> None:
    """``include_payloads=True`` puts the event's output in the line."""
    logger = RecordingLogger()
    await LogEventSink(logger, include_payloads=True).publish(
        WorkflowCompleted(workflow_run_id="r1", sequence=9, timestamp=T0, output={"n": 1})
    )
    ((name, fields),) = logger.lines
    assert name == "workflow:completed"
    assert fields["output"] == {"n": 1}


async def test_log_sink_default_logger_goes_through_stdlib_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default sink logs to the ``treadle.events`` stdlib logger, so the application's
    logging configuration decides where lines go."""
    with caplog.at_level(logging.INFO, logger="treadle.events"):
        await LogEventSink().publish(created("run-42", 3))
    records = [r for r in caplog.records if r.name == "treadle.events"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "workflow:created" in message
    assert "run-42" in message


# -- scheduler ---------------------------------------------------------------------------


@pytest.fixture
async def scheduler(backend: Any) -> AsyncIterator[Any]:
    """The Scheduler of each backend: in-memory, or the SQL table on the backend's database."""
    if backend.name == "memory":
        yield InMemoryScheduler()
        return
    from treadle.adapters.sql import SqlScheduler

    yield SqlScheduler(backend.persistence)


def command(n: int) -> dict[str, Any]:
    return {"type": "run.signal", "workflow_run_id": f"r{n}", "name": "tick", "payload": {"n": n}}


async def test_scheduled_commands_come_due_in_time_order(scheduler: Any) -> None:
    """``due`` returns commands due at or before ``now``, earliest first (ties by key), each
    exactly as scheduled, and removes them."""
    await scheduler.schedule("c", command(3), at(30))
    await scheduler.schedule("b", command(2), at(10))
    await scheduler.schedule("a", command(1), at(10))
    await scheduler.schedule("d", command(4), at(10.000001))
    assert await scheduler.due(at(9.999999)) == []
    assert await scheduler.due(at(10)) == [command(1), command(2)]
    assert await scheduler.due(at(10)) == []
    assert await scheduler.due(at(100)) == [command(4), command(3)]
    assert await scheduler.due(at(1000)) == []


async def test_due_honours_limit(scheduler: Any) -> None:
    """``limit`` caps what one call hands out; the rest stay for the next call."""
    for n in range(5):
        await scheduler.schedule(f"k{n}", command(n), at(n))
    assert await scheduler.due(at(100), limit=2) == [command(0), command(1)]
    assert await scheduler.due(at(100), limit=0) == []
    assert await scheduler.due(at(100)) == [command(2), command(3), command(4)]


async def test_scheduling_a_key_again_replaces_it(scheduler: Any) -> None:
    """The same key holds one command: rescheduling moves it and replaces the command."""
    await scheduler.schedule("timer", command(1), at(10))
    await scheduler.schedule("timer", command(2), at(50))
    assert await scheduler.due(at(20)) == []
    assert await scheduler.next_due_at() == at(50)
    assert await scheduler.due(at(50)) == [command(2)]
    await scheduler.schedule("timer", command(3), at(5))
    assert await scheduler.due(at(5)) == [command(3)]


async def test_cancel_removes_a_scheduled_command(scheduler: Any) -> None:
    """``cancel`` reports whether the key was scheduled; a cancelled command never comes due."""
    await scheduler.schedule("a", command(1), at(1))
    await scheduler.schedule("b", command(2), at(2))
    assert await scheduler.cancel("a") is True
    assert await scheduler.cancel("a") is False
    assert await scheduler.cancel("never") is False
    assert await scheduler.due(at(100)) == [command(2)]
    assert await scheduler.cancel("b") is False


async def test_next_due_at_is_the_earliest_scheduled_time(scheduler: Any) -> None:
    """Hosts sleep until ``next_due_at``: the earliest pending time in UTC, or None."""
    assert await scheduler.next_due_at() is None
    await scheduler.schedule("late", command(1), at(60))
    await scheduler.schedule("soon", command(2), at(0.5))
    due = await scheduler.next_due_at()
    assert due == at(0.5)
    assert due is not None
    assert due.utcoffset() == timedelta(0)
    await scheduler.due(at(1))
    assert await scheduler.next_due_at() == at(60)


async def test_scheduled_commands_round_trip_as_json(scheduler: Any) -> None:
    """Commands are JSON mappings: nested payloads come back equal, as plain dicts."""
    nested = {"type": "run.signal", "payload": {"list": [1, 2.5, None, True], "s": "é"}}
    await scheduler.schedule("k", nested, at(0))
    (got,) = await scheduler.due(at(0))
    assert got == nested
    assert isinstance(got, dict)


async def test_a_command_needs_a_type(scheduler: Any) -> None:
    """Scheduling a mapping without ``type`` is a ``ValueError`` naming the key; nothing is
    stored."""
    with pytest.raises(ValueError, match="bad-key"):
        await scheduler.schedule("bad-key", {"workflow_run_id": "r1"}, at(0))
    assert await scheduler.next_due_at() is None


# -- clock ----------------------------------------------------------------------------------


def test_system_clock_is_aware_utc() -> None:
    """The production clock returns timezone-aware UTC that does not go backwards."""
    clock = SystemClock()
    first = clock.now()
    second = clock.now()
    assert first.utcoffset() == timedelta(0)
    assert second >= first
    assert abs(first - datetime.now(UTC)) < timedelta(minutes=1)


def test_fake_clock_moves_only_when_told() -> None:
    """``FakeClock`` stands still, advances by timedeltas or seconds, and stays aware UTC."""
    clock = FakeClock(T0)
    assert clock.now() == clock.now() == T0
    assert clock.advance(timedelta(minutes=1)) == at(60)
    assert clock.advance(0.5) == at(60.5)
    clock.set(at(100))
    assert clock.now() == at(100)
    assert clock.now().utcoffset() == timedelta(0)
    assert FakeClock().now().utcoffset() == timedelta(0)


def test_fake_clock_refuses_naive_times_and_going_backwards() -> None:
    """Naive datetimes and moves into the past are errors, so tests cannot fake ambiguity."""
    with pytest.raises(ValueError, match="aware"):
        FakeClock(datetime(2026, 1, 1))
    clock = FakeClock(T0)
    with pytest.raises(ValueError, match="aware"):
        clock.set(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="backwards"):
        clock.set(at(-1))
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_fake_clock_reports_utc_whatever_zone_it_starts_in() -> None:
    """A FakeClock started in another zone still returns UTC, as the Clock port promises."""
    clock = FakeClock(datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))))
    assert clock.now() == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert clock.now().utcoffset() == timedelta(0)


async def test_concurrent_drains_never_hand_out_a_command_twice(scheduler: Any) -> None:
    """Ticks draining at once (several workers) share out the due commands without overlap."""
    for n in range(12):
        await scheduler.schedule(f"k{n:02}", command(n), at(n))
    batches = await asyncio.gather(*(scheduler.due(at(100), limit=5) for _ in range(4)))
    handed = [c["workflow_run_id"] for batch in batches for c in batch]
    assert sorted(handed) == sorted(f"r{n}" for n in range(12))
    assert await scheduler.next_due_at() is None
