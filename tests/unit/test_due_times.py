"""Due times as a commit announces them (``due:`` NOTIFY payloads, parsed by the worker
of another process) and as a worker keeps them (``DueSchedule``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from treadle.adapters.due_times import DueWatchers, due_payload, earliest, parse_due
from treadle.adapters.run_ends import RUN_END_PREFIX
from treadle.runtime.due import MAX_KNOWN, DueSchedule

T0 = datetime(2026, 12, 7, 17, 30, 0, 123456, tzinfo=UTC)


def test_a_payload_round_trips_every_kind_to_the_microsecond() -> None:
    """What one process sends is what another reads: each kind's time, exactly."""
    due = {"job": T0, "poll": T0 + timedelta(seconds=2), "command": T0 + timedelta(days=1)}
    payload = due_payload(due)  # type: ignore[arg-type]  # literal keys
    assert payload.startswith("due:")
    assert parse_due(payload) == due


def test_a_payload_is_sent_in_utc_and_read_back_aware() -> None:
    """A time in another zone is sent as UTC; a naive time (SQLite hands some back so)
    is taken as UTC, never as the receiver's local time."""
    east = T0.astimezone(timezone(timedelta(hours=5)))
    assert "+00:00" in due_payload({"job": east})
    parsed = parse_due("due:poll=2026-12-07T17:30:00.123456")
    assert parsed == {"poll": T0}


def test_other_payloads_are_not_due_times() -> None:
    """Wake-ups for runs and jobs, run ends and the reconnect wake are left to their
    own handlers."""
    for payload in ("", "jobs", "run", RUN_END_PREFIX + "r1,r2"):
        assert parse_due(payload) is None


def test_unreadable_parts_are_skipped_not_fatal() -> None:
    """A part of an unknown kind (a newer sender) or a bad time is skipped; the rest is
    still read. A due time is a hint: the worker's tick finds what a hint misses."""
    payload = f"due:later={T0.isoformat()},job=not-a-time,poll={T0.isoformat()},junk"
    assert parse_due(payload) == {"poll": T0}
    assert parse_due("due:") == {}


def test_a_transaction_keeps_the_earliest_time_of_each_kind() -> None:
    """Many retries in one commit send one payload, holding the earliest of each kind."""
    known: dict = {}  # type: ignore[type-arg]
    earliest(known, "job", T0 + timedelta(seconds=5))
    earliest(known, "job", T0)
    earliest(known, "job", T0 + timedelta(seconds=1))
    earliest(known, "poll", T0 + timedelta(seconds=9))
    assert known == {"job": T0, "poll": T0 + timedelta(seconds=9)}


def test_a_failing_watcher_does_not_stop_the_others() -> None:
    """A watcher's bug never reaches the committer, and the next watcher still hears."""
    watchers = DueWatchers()
    heard: list[object] = []

    def broken(due: object) -> None:
        raise RuntimeError("bug")

    watchers.watch(broken)
    stop = watchers.watch(heard.append)
    watchers.tell({"job": T0})
    assert heard == [{"job": T0}]
    stop()
    stop()  # idempotent
    watchers.tell({"job": T0})
    assert heard == [{"job": T0}]


def test_the_schedule_hands_out_due_times_in_order_per_kind() -> None:
    """The worker sleeps until the earliest time it knows; once past, a time is taken
    off and the next one becomes the earliest, so a second retry is not forgotten."""
    schedule = DueSchedule()
    assert schedule.add("job", T0 + timedelta(seconds=2)) is True
    assert schedule.add("job", T0 + timedelta(seconds=5)) is False  # later: no re-arm
    assert schedule.add("job", T0 + timedelta(seconds=1)) is True  # earlier: re-arm
    assert schedule.add("poll", T0 + timedelta(seconds=3)) is True
    assert schedule.earliest(["job"]) == T0 + timedelta(seconds=1)
    assert schedule.earliest(["poll", "command"]) == T0 + timedelta(seconds=3)
    assert schedule.take_due(["job", "poll"], T0 + timedelta(seconds=2)) == {"job"}
    assert schedule.earliest(["job"]) == T0 + timedelta(seconds=5)
    assert schedule.take_due(["job"], T0 + timedelta(seconds=2)) == set()
    assert schedule.take_due(["poll", "command"], T0 + timedelta(seconds=3)) == {"poll"}
    assert schedule.earliest(["poll", "command"]) is None


def test_the_schedule_keeps_the_earliest_when_it_overflows() -> None:
    """Past ``MAX_KNOWN`` times of one kind the latest are forgotten (the tick finds
    them); the earliest, which the worker wakes for next, are kept."""
    schedule = DueSchedule()
    for i in range(MAX_KNOWN + 1, 0, -1):
        schedule.add("command", T0 + timedelta(seconds=i))
    assert schedule.earliest(["command"]) == T0 + timedelta(seconds=1)
    assert schedule.take_due(["command"], T0 + timedelta(seconds=MAX_KNOWN // 2)) == {"command"}
    assert schedule.earliest(["command"]) is None
