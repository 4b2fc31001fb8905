"""The Lambda handler on the documented AWS event shapes: SQS batches with partial batch
responses, EventBridge scheduled events, direct invocations, the time budget, one build
per container, and SQS wake-ups (with a fake client that records what it was sent).

The handler runs on a SQLite file, as a deployed function shares its database with the
clients that start runs; the tests start runs through their own ``Engine``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, RetryPolicy, WorkflowBuilder, define_stage
from treadle.adapters.aws import SqsWakeups
from treadle.adapters.memory import InMemoryJobTransport, InMemoryPersistence
from treadle.hosts.aws_lambda import LambdaHandler, TickFailedError, make_handler
from treadle.kernel.errors import TreadleError
from treadle.kernel.model import Job, JobStatus, RunFilter, RunStatus
from treadle.testing import FakeClock


class Num(BaseModel):
    n: int


@define_stage(id="a", input=Num, output=Num)
async def stage_a(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n + 1)


@define_stage(id="b", input=Num, output=Num)
async def stage_b(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n * 10)


@define_stage(id="never-done", input=Num, output=Num)
async def never_done(ctx):  # type: ignore[no-untyped-def]
    await asyncio.Event().wait()  # only the deadline ends it
    return ctx.input


@define_stage(id="fails-once", input=Num, output=Num, retry=RetryPolicy(initial_delay=30))
async def fails_once(ctx):  # type: ignore[no-untyped-def]
    if ctx.attempt == 1:
        raise RuntimeError("transient")
    return ctx.input


@define_stage(id="c", input=Num, output=Num)
async def stage_c(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n * 10)


PIPE = WorkflowBuilder("pipe", input=Num).pipe(stage_a).pipe(stage_b).build()
THREE = WorkflowBuilder("three", input=Num).pipe(stage_a).pipe(stage_b).pipe(stage_c).build()
STUCK = WorkflowBuilder("stuck", input=Num).pipe(never_done).build()
RETRY = WorkflowBuilder("retry", input=Num).pipe(fails_once).build()
WORKFLOWS = [PIPE, THREE, STUCK, RETRY]


class FakeContext:
    """The one Lambda context method the handler reads."""

    def __init__(self, remaining_ms: int = 300_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


class FakeSqs:
    """Records ``send_message`` calls; ``fail`` makes them raise."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail = False

    def send_message(self, *, QueueUrl: str, MessageBody: str, **kwargs: Any) -> dict[str, str]:  # noqa: N803 - boto3's names
        if self.fail:
            raise ConnectionError("sqs unreachable")
        self.sent.append({"QueueUrl": QueueUrl, "MessageBody": MessageBody, **kwargs})
        return {"MessageId": f"m{len(self.sent)}"}

    def drain(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


def sqs_event(*bodies: str) -> dict[str, Any]:
    """An SQS event as Lambda delivers it (the documented record shape)."""
    return {
        "Records": [
            {
                "messageId": f"msg-{i}",
                "receiptHandle": f"AQEB-{i}",
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1545082649183",
                    "SenderId": "AIDAIENQZJOLO23YVJ4VO",
                    "ApproximateFirstReceiveTimestamp": "1545082649185",
                },
                "messageAttributes": {},
                "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:treadle-jobs",
                "awsRegion": "us-east-2",
            }
            for i, body in enumerate(bodies)
        ]
    }


SCHEDULED_EVENT = {
    "version": "0",
    "id": "89d1a02d-5ec7-412e-82f5-13505f849b41",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": "123456789012",
    "time": "2016-12-30T18:44:49Z",
    "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/treadle-tick"],
    "detail": {},
}


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lambda.db'}"


@pytest.fixture
def handlers() -> Iterator[list[LambdaHandler]]:
    made: list[LambdaHandler] = []
    yield made
    for handler in made:
        handler.close()


def _handler(handlers: list[LambdaHandler], db: str, **options: Any) -> LambdaHandler:
    handler = make_handler(db=db, workflows=WORKFLOWS, **options)
    handlers.append(handler)
    return handler


def _start(db: str, workflow: str = "pipe", count: int = 1) -> list[str]:
    async def go() -> list[str]:
        async with await Engine.open(db, workflows=WORKFLOWS) as engine:
            return [(await engine.start(workflow, {"n": 1})).run_id for _ in range(count)]

    return asyncio.run(go())


def _runs(db: str, *run_ids: str) -> list[Any]:
    async def go() -> list[Any]:
        async with await Engine.open(db, workflows=WORKFLOWS) as engine:
            return [await engine.get_run(r) for r in run_ids]

    return asyncio.run(go())


def _event_types(db: str, run_id: str) -> list[str]:
    async def go() -> list[str]:
        async with await Engine.open(db, workflows=WORKFLOWS) as engine:
            assert engine.backend is not None
            async with engine.backend.persistence.transaction() as tx:
                return [e.type for e in await tx.outbox.events_for_run(run_id)]

    return asyncio.run(go())


def _jobs(handler: LambdaHandler) -> list[Job]:
    assert handler.host is not None
    transport = handler.host.kernel.deps.job_transport
    persistence = handler.host.kernel.deps.persistence

    async def go() -> list[Job]:
        jobs = []
        async with persistence.transaction() as tx:
            for run in await tx.runs.query(_all_runs()):
                jobs.extend(await transport.live_jobs(tx, run.id))
        return jobs

    assert handler._loop is not None
    return handler._loop.run_until_complete(go())


def _queued_job_of(db: str, handler: LambdaHandler, run_id: str) -> str:
    """Claim the pending runs (a tick) and return ``run_id``'s queued job."""
    handler({"action": "tick"}, FakeContext())
    [job] = [j for j in _jobs(handler) if j.workflow_run_id == run_id]
    return job.id


def _all_runs() -> RunFilter:
    return RunFilter(limit=100)


def test_sqs_batch_runs_each_message_and_reports_no_failures(
    handlers: list[LambdaHandler], db: str
) -> None:
    """Two "any work" messages run the two first-group jobs; every message succeeded, so
    ``batchItemFailures`` is empty and SQS deletes the batch. (With
    ``process_on_message=False`` each message runs its one job and nothing more.)"""
    runs = _start(db, count=2)
    handler = _handler(handlers, db, process_on_message=False)
    response = handler(sqs_event("{}", "{}"), FakeContext())
    assert response == {"batchItemFailures": []}
    stages = [s.status.value for run in _runs(db, *runs) for s in run.stages]
    assert stages == ["COMPLETED", "PENDING"] * 2  # each message ran one job


def test_one_sqs_message_runs_a_whole_three_stage_run(
    handlers: list[LambdaHandler], db: str
) -> None:
    """One wake-up message is enough for a run of three stages: after the message's own
    job the function goes on with the stages each completed stage enqueued, within the
    time budget, instead of leaving them for the EventBridge tick."""
    (run_id,) = _start(db, "three")
    handler = _handler(handlers, db)
    assert handler(sqs_event("{}"), FakeContext()) == {"batchItemFailures": []}
    run = _runs(db, run_id)[0]
    assert [s.status.value for s in run.stages] == ["COMPLETED"] * 3
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 200})


def test_carrying_on_after_the_messages_stops_at_the_budget(
    handlers: list[LambdaHandler], db: str
) -> None:
    """The work after the messages is bounded by the same safety buffer: a stage that
    would outlive it is released for the next invocation, and since no message asked
    for it, the batch still reports no failure."""
    (done_id,) = _start(db)
    (stuck_id,) = _start(db, "stuck")
    handler = _handler(handlers, db, safety_buffer_ms=1_000, concurrency=2)
    job_id = _queued_job_of(db, handler, done_id)
    # The message names the quick run's first job; carrying on runs its second stage
    # beside the stuck one, which the deadline cuts off.
    response = handler(sqs_event(json.dumps({"job_id": job_id})), FakeContext(2_500))
    assert response == {"batchItemFailures": []}
    assert _runs(db, done_id)[0].status is RunStatus.COMPLETED
    stuck_jobs = [j for j in _jobs(handler) if j.workflow_run_id == stuck_id]
    assert [(j.status, j.worker_id) for j in stuck_jobs] == [(JobStatus.QUEUED, None)]


def test_malformed_message_is_the_only_batch_failure(
    handlers: list[LambdaHandler], db: str
) -> None:
    """A body that is not a Treadle message is reported (so it ends in the DLQ); the good
    message beside it is processed and not retried."""
    (run_id,) = _start(db)
    handler = _handler(handlers, db)
    response = handler(sqs_event("{not json", "{}"), FakeContext())
    assert response == {"batchItemFailures": [{"itemIdentifier": "msg-0"}]}
    assert _runs(db, run_id)[0].stages[0].status.value == "COMPLETED"


def test_messages_past_the_safety_buffer_are_not_started(
    handlers: list[LambdaHandler], db: str
) -> None:
    """With less time left than the safety buffer, no message is taken: all are failures
    (redelivered later) and no job was leased."""
    _start(db, count=2)
    handler = _handler(handlers, db, safety_buffer_ms=10_000)
    response = handler(sqs_event("{}", "{}"), FakeContext(remaining_ms=9_000))
    assert response == {
        "batchItemFailures": [{"itemIdentifier": "msg-0"}, {"itemIdentifier": "msg-1"}]
    }
    assert [j.status for j in _jobs(handler)] == []  # nothing claimed or leased


def test_stage_cut_off_by_remaining_time_is_released(
    handlers: list[LambdaHandler], db: str
) -> None:
    """A stage that outlives the budget is cancelled and its job released for the next
    invocation; its message is reported as a failure."""
    (run_id,) = _start(db, "stuck")
    handler = _handler(handlers, db, safety_buffer_ms=1_000)
    # A 1.5 s budget: long enough for the claim and phase 1 to commit on a loaded
    # machine (a 100 ms budget could run out before the stage started, and then the
    # message is deferred instead of the running stage being cut off).
    response = handler(sqs_event("{}"), FakeContext(remaining_ms=2_500))
    assert response == {"batchItemFailures": [{"itemIdentifier": "msg-0"}]}
    (job,) = _jobs(handler)
    assert job.status is JobStatus.QUEUED
    assert job.worker_id is None
    assert "stage:failed" in _event_types(db, run_id)


def test_adapters_are_built_once_per_container(handlers: list[LambdaHandler], db: str) -> None:
    """Warm invocations reuse the host, its backend and the event loop."""
    handler = _handler(handlers, db)
    assert handler.host is None  # nothing built at import / factory time
    handler({"action": "tick"}, FakeContext())
    host, loop = handler.host, handler._loop
    handler(sqs_event("{}"), FakeContext())
    handler(SCHEDULED_EVENT, FakeContext())
    assert handler.builds == 1
    assert handler.host is host
    assert handler._loop is loop


def test_failed_build_is_retried_on_the_next_invocation(
    handlers: list[LambdaHandler], tmp_path: Path
) -> None:
    """A build that fails (bad database) is not cached."""
    handler = _handler(handlers, f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(TreadleError, match="does not exist"):
        handler({"action": "tick"}, FakeContext())
    (tmp_path / "missing").mkdir()
    assert handler({"action": "tick"}, FakeContext())["ok"] is True
    assert handler.builds == 1


def test_scheduled_event_ticks_then_processes(handlers: list[LambdaHandler], db: str) -> None:
    """An EventBridge schedule runs one tick (claiming the run) and then the due jobs, so
    the whole pipeline completes in one invocation."""
    (run_id,) = _start(db)
    handler = _handler(handlers, db)
    response = handler(SCHEDULED_EVENT, FakeContext())
    assert response["tick"]["ok"] is True
    assert len(response["tick"]["steps"]["claim"]["result"]["claimed"]) == 1
    assert response["process"]["succeeded"] == 2
    run = _runs(db, run_id)[0]
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 20})


def test_scheduled_event_fires_a_due_cron_schedule(handlers: list[LambdaHandler], db: str) -> None:
    """The EventBridge tick fires a cron schedule that fell due while nothing ran, and the
    run it starts completes in the same invocation."""

    async def make() -> None:
        past = FakeClock(datetime.now(UTC) - timedelta(hours=2))
        async with await Engine.open(db, workflows=WORKFLOWS, clock=past) as engine:
            await engine.schedules.create("hourly", "pipe", cron="0 * * * *", input={"n": 1})

    asyncio.run(make())
    response = _handler(handlers, db)(SCHEDULED_EVENT, FakeContext())
    fired = response["tick"]["steps"]["schedules"]["result"]
    assert fired["fired"] == 1
    (run,) = _runs(db, *fired["workflow_run_ids"])
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 20})
    assert run.search_attributes["treadle.schedule_id"] == "hourly"


def test_scheduled_tick_with_a_failing_step_raises(
    handlers: list[LambdaHandler], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick step that fails (here the scheduler) raises after the other steps and the
    processing ran, so the invocation counts as an error in the function's metrics."""
    (run_id,) = _start(db)
    handler = _handler(handlers, db)
    handler({"action": "tick"}, FakeContext())
    assert handler.host is not None

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("scheduler down")

    monkeypatch.setattr(handler.host.kernel.deps.scheduler, "due", broken)
    with pytest.raises(TickFailedError, match="scheduled"):
        handler(SCHEDULED_EVENT, FakeContext())
    assert _runs(db, run_id)[0].status is RunStatus.COMPLETED  # the processing still ran


def test_direct_invocations(handlers: list[LambdaHandler], db: str) -> None:
    """``{"action": "tick"}`` returns the tick report, ``{"action": "process"}`` the
    process report; anything else is a one-line error."""
    runs = _start(db, count=2)
    handler = _handler(handlers, db)
    tick = handler({"action": "tick"}, FakeContext())
    assert tick["ok"] is True
    assert list(tick["steps"])[:2] == ["schedules", "claim"]
    one = handler({"action": "process", "max_jobs": 1}, FakeContext())
    assert (one["processed"], one["stopped"]) == (1, "max_jobs")
    rest = handler({"action": "process"}, None)  # no context: no time limit
    assert (rest["processed"], rest["stopped"]) == (3, "idle")
    assert {r.status for r in _runs(db, *runs)} == {RunStatus.COMPLETED}
    with pytest.raises(TreadleError, match="unrecognised event"):
        handler({"hello": "world"}, FakeContext())


def test_missing_database_url_is_a_clear_error(
    handlers: list[LambdaHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without db= or TREADLE_DATABASE_URL the first invocation says what to set."""
    monkeypatch.delenv("TREADLE_DATABASE_URL", raising=False)
    handler = make_handler(workflows=WORKFLOWS)
    handlers.append(handler)
    with pytest.raises(TreadleError, match="TREADLE_DATABASE_URL"):
        handler({"action": "tick"}, FakeContext())


# -- SQS wake-ups ----------------------------------------------------------------------


async def test_wakeups_are_sent_only_after_commit() -> None:
    """A job enqueued in a transaction that rolls back sends nothing; a committed one
    sends one message naming it, delayed until it is due."""
    clock = FakeClock()
    sqs = FakeSqs()
    wakeups = SqsWakeups(sqs, "https://sqs/q", clock=clock)
    inner = InMemoryPersistence()
    persistence, transport = wakeups.wrap(inner, InMemoryJobTransport(inner))
    job = Job(
        id="j1",
        workflow_run_id="r1",
        workflow_id="w",
        stage_id="s",
        next_poll_at=clock.now(),
        enqueued_at=clock.now(),
    )

    async def enqueue_then_fail() -> None:
        async with persistence.transaction() as tx:
            await transport.enqueue(tx, [job])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await enqueue_then_fail()
    assert sqs.sent == []
    async with persistence.transaction() as tx:
        await transport.enqueue(tx, [job])
    assert sqs.drain() == [{"QueueUrl": "https://sqs/q", "MessageBody": '{"job_id": "j1"}'}]
    async with persistence.transaction() as tx:
        await transport.requeue(tx, "j1", clock.now() + _seconds(42.5))
    (delayed,) = sqs.drain()
    assert delayed["DelaySeconds"] == 43
    async with persistence.transaction() as tx:
        await transport.requeue(tx, "j1", clock.now() + _seconds(3600))
    assert sqs.drain()[0]["DelaySeconds"] == 900  # SQS's maximum; the tick covers the rest
    sqs.fail = True
    async with persistence.transaction() as tx:  # a failed send never fails the commit
        await transport.requeue(tx, "j1", clock.now())
    assert (wakeups.sent, wakeups.failed) == (3, 1)
    sqs.fail = False
    await wakeups.request_work()
    assert sqs.drain() == [{"QueueUrl": "https://sqs/q", "MessageBody": "{}"}]


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def test_wakeups_drive_a_run_to_completion_and_duplicates_are_harmless(
    handlers: list[LambdaHandler], db: str
) -> None:
    """The first job's commit announces the next group's job; feeding the queue's messages
    back into the handler (twice each, as SQS may) completes the run with every stage
    committed exactly once."""
    sqs = FakeSqs()
    (run_id,) = _start(db)
    handler = _handler(handlers, db, wakeup_queue_url="https://sqs/q", sqs_client=sqs)
    assert handler(sqs_event("{}"), FakeContext()) == {"batchItemFailures": []}
    rounds = 0
    while pending := sqs.drain():
        rounds += 1
        bodies = [m["MessageBody"] for m in pending]
        assert all(json.loads(b)["job_id"] for b in bodies)
        response = handler(sqs_event(*bodies, *bodies), FakeContext())  # each one twice
        assert response == {"batchItemFailures": []}
        assert rounds < 5
    run = _runs(db, run_id)[0]
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 20})
    events = _event_types(db, run_id)
    assert events.count("stage:completed") == 2
    assert events.count("stage:started") == 2
    # A stale message long after the run finished is still harmless.
    assert handler(sqs_event(*bodies), FakeContext()) == {"batchItemFailures": []}


def test_retry_wakeup_is_delayed_by_the_backoff(handlers: list[LambdaHandler], db: str) -> None:
    """A failed attempt's requeue is announced with the retry delay, so SQS holds the
    message until the job is due."""
    sqs = FakeSqs()
    _start(db, "retry")
    handler = _handler(handlers, db, wakeup_queue_url="https://sqs/q", sqs_client=lambda: sqs)
    handler(sqs_event("{}"), FakeContext())
    claimed, message = sqs.drain()  # the claim's enqueue, then the failed attempt's requeue
    assert "DelaySeconds" not in claimed
    assert claimed["MessageBody"] == message["MessageBody"]
    assert 29 <= message["DelaySeconds"] <= 30
    early = handler(sqs_event(message["MessageBody"]), FakeContext())
    assert early == {"batchItemFailures": []}  # not due yet: skipped, not retried


def test_handler_reads_its_settings_from_the_environment(
    handlers: list[LambdaHandler], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make_handler(workflows)`` takes the database and the wake-up queue from
    TREADLE_DATABASE_URL and TREADLE_WAKE_QUEUE_URL, as the deployment guide sets them."""
    monkeypatch.setenv("TREADLE_DATABASE_URL", db)
    monkeypatch.setenv("TREADLE_WAKE_QUEUE_URL", "https://sqs/env-queue")
    sqs = FakeSqs()
    _start(db)
    handler = make_handler(WORKFLOWS, sqs_client=sqs)
    handlers.append(handler)
    assert handler(sqs_event("{}"), FakeContext()) == {"batchItemFailures": []}
    assert {m["QueueUrl"] for m in sqs.sent} == {"https://sqs/env-queue"}
