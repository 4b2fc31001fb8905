"""The serverless host: one message one job, draining the queue within a budget, the
maintenance tick's report, and harmless duplicate or stale messages. In-memory
adapters under a FakeClock; only the deadline tests wait (briefly) in real time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.hosts.serverless import JobOutcome, ServerlessHost, parse_message
from treadle.kernel import commands as c
from treadle.kernel.errors import TransientStorageError, TreadleError
from treadle.kernel.model import JobStatus, RunStatus
from treadle.runtime import STEP_ORDER, Backend, open_backend
from treadle.testing import FakeClock


class Num(BaseModel):
    n: int


GATE: dict[str, Any] = {}


@define_stage(id="inc", input=Num, output=Num)
async def inc(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n + 1)


@define_stage(id="inc2", input=Num, output=Num)
async def inc2(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n + 1)


@define_stage(id="flaky", input=Num, output=Num, retry=RetryPolicy(max_attempts=2))
async def flaky(ctx):  # type: ignore[no-untyped-def]
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return ctx.input


@define_stage(id="blocking", input=Num, output=Num)
async def blocking(ctx):  # type: ignore[no-untyped-def]
    GATE["entered"].set()
    await GATE["open"].wait()
    return ctx.input


TWO = WorkflowBuilder("two", input=Num).pipe(inc).pipe(inc2).build()
FLAKY = WorkflowBuilder("flaky", input=Num).pipe(flaky).build()
BLOCKING = WorkflowBuilder("blocking", input=Num).pipe(blocking).build()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    GATE.clear()
    GATE.update(entered=asyncio.Event(), open=asyncio.Event())
    opened = await open_backend("memory://", clock=FakeClock())
    yield opened
    await opened.aclose()


@pytest.fixture
async def host(backend: Backend) -> ServerlessHost:
    return await ServerlessHost.open("memory://", [TWO, FLAKY, BLOCKING], backend=backend)


async def _start(host: ServerlessHost, workflow: str = "two") -> str:
    result = await host.kernel.dispatch(c.RunCreate(workflow_id=workflow, input={"n": 1}))
    return str(result.workflow_run_id)


async def _claim(host: ServerlessHost) -> list[str]:
    """Claim PENDING runs; the ids of the jobs that enqueued."""
    result = await host.kernel.dispatch(c.RunClaimPending(worker_id="test", max_claims=10))
    return [job_id for claim in result.claimed for job_id in claim.job_ids]


def _jobs(backend: Backend) -> dict[str, Any]:
    return dict(backend.job_transport.jobs)  # type: ignore[attr-defined]


async def _events(backend: Backend, run_id: str) -> list[str]:
    async with backend.persistence.transaction() as tx:
        return [e.type for e in await tx.outbox.events_for_run(run_id)]


def test_parse_message_accepts_the_documented_forms() -> None:
    """A mapping, its JSON, a bare id, or nothing ("any work"); other shapes are errors."""
    assert parse_message({"job_id": "j1"}) == "j1"
    assert parse_message(json.dumps({"job_id": "j1"})) == "j1"
    assert parse_message(b'{"job_id": "j1"}') == "j1"
    assert parse_message("j1") == "j1"
    assert parse_message({}) is None
    assert parse_message("{}") is None
    assert parse_message("") is None
    assert parse_message(None) is None
    with pytest.raises(TreadleError, match="not valid JSON"):
        parse_message("{oops")
    with pytest.raises(TreadleError, match="job_id must be a non-empty string"):
        parse_message({"job_id": 7})
    with pytest.raises(TreadleError, match="must be a mapping"):
        parse_message(["j1"])


async def test_handle_job_runs_the_named_job(host: ServerlessHost, backend: Backend) -> None:
    """A message naming a due job executes it and commits the stage result."""
    run_id = await _start(host)
    (job_id,) = await _claim(host)
    outcome = await host.handle_job({"job_id": job_id})
    assert outcome.status == "completed"
    assert outcome.ok
    assert (outcome.job_id, outcome.requested_job_id) == (job_id, job_id)
    assert outcome.workflow_run_id == run_id
    assert outcome.stage_id == "inc"
    assert _jobs(backend)[job_id].status is JobStatus.COMPLETED


async def test_any_work_message_claims_pending_runs(host: ServerlessHost) -> None:
    """``{}`` claims a PENDING run first, so a run started since the last tick is served."""
    run_id = await _start(host)
    outcome = await host.handle_job({})
    assert outcome.status == "completed"
    assert outcome.workflow_run_id == run_id
    assert outcome.requested_job_id is None


async def test_duplicate_and_stale_messages_are_skipped(
    host: ServerlessHost, backend: Backend
) -> None:
    """Redelivering a finished job's message, or naming an unknown job, runs nothing and
    is still ``ok``: the queue may delete it."""
    run_id = await _start(host)
    (job_id,) = await _claim(host)
    first = await host.handle_job({"job_id": job_id})
    assert first.status == "completed"
    again = await host.handle_job({"job_id": job_id})
    assert again.status == "skipped"
    assert again.ok
    assert again.reason == "job is COMPLETED"
    unknown = await host.handle_job({"job_id": "no-such-job"})
    assert (unknown.status, unknown.reason, unknown.ok) == ("skipped", "unknown job", True)
    assert (await _events(backend, run_id)).count("stage:completed") == 1


async def test_message_for_a_job_not_yet_due_is_skipped(
    host: ServerlessHost, backend: Backend
) -> None:
    """A retry waiting out its backoff is not run early by a stray message."""
    await _start(host, "flaky")
    (job_id,) = await _claim(host)
    failed = await host.handle_job({"job_id": job_id})
    assert (failed.status, failed.retryable, failed.ok) == ("failed", True, True)
    early = await host.handle_job({"job_id": job_id})
    assert early.status == "skipped"
    assert early.reason is not None
    assert early.reason.startswith("not due until")
    backend.clock.advance(timedelta(minutes=1))  # type: ignore[attr-defined]
    assert (await host.handle_job({"job_id": job_id})).status == "completed"


async def test_message_for_a_leased_job_is_skipped(host: ServerlessHost, backend: Backend) -> None:
    """A job another worker holds is left alone."""
    await _start(host)
    (job_id,) = await _claim(host)
    leased = await backend.job_transport.dequeue("other-worker", backend.clock.now())
    assert [j.id for j in leased] == [job_id]
    outcome = await host.handle_job({"job_id": job_id})
    assert outcome.status == "skipped"
    assert outcome.reason == "leased by 'other-worker'"


async def test_handle_job_with_nothing_due_is_idle(host: ServerlessHost) -> None:
    """An "any work" message on an empty queue does nothing and is ok."""
    outcome = await host.handle_job(None)
    assert (outcome.status, outcome.ok) == ("idle", True)


async def test_handle_job_past_its_deadline_is_deferred(host: ServerlessHost) -> None:
    """A message handled with no time left is not started, and not ok (redeliver it)."""
    await _start(host)
    outcome = await host.handle_job({}, deadline=0)
    assert (outcome.status, outcome.ok) == ("deferred", False)
    past = datetime.now(UTC) - timedelta(seconds=1)
    assert (await host.handle_job({}, deadline=past)).status == "deferred"


async def test_job_cut_off_by_the_deadline_is_released(
    host: ServerlessHost, backend: Backend
) -> None:
    """A stage still running at the deadline is cancelled and its job queued again at
    once; the outcome asks for redelivery."""
    run_id = await _start(host, "blocking")
    outcome = await host.handle_job({}, deadline=timedelta(seconds=0.05))
    assert GATE["entered"].is_set()
    assert (outcome.status, outcome.ok, outcome.reason) == ("released", False, "deadline")
    (job,) = _jobs(backend).values()
    assert job.status is JobStatus.QUEUED
    assert job.next_poll_at <= backend.clock.now()
    assert "stage:failed" in await _events(backend, run_id)
    GATE["open"].set()
    assert (await host.handle_job({"job_id": job.id})).status == "completed"


async def test_storage_failure_is_an_error_outcome(host: ServerlessHost, backend: Backend) -> None:
    """When the queue cannot be read the message is not ok, so SQS delivers it again."""

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise TransientStorageError("database unreachable")

    backend.job_transport.dequeue = down  # type: ignore[method-assign]
    outcome = await host.handle_job({})
    assert (outcome.status, outcome.ok) == ("error", False)
    assert outcome.error is not None
    assert "database unreachable" in outcome.error
    report = await host.process_available_jobs()
    assert report.stopped == "error"
    assert report.error is not None
    assert "database unreachable" in report.error


async def test_process_available_jobs_runs_whole_runs(
    host: ServerlessHost, backend: Backend
) -> None:
    """Claims PENDING runs and keeps going while finished jobs enqueue the next group:
    two two-stage runs complete in one call."""
    runs = [await _start(host), await _start(host)]
    report = await host.process_available_jobs()
    assert (report.processed, report.succeeded, report.failed, report.released) == (4, 4, 0, 0)
    assert report.claimed_runs == 2
    assert report.stopped == "idle"
    for run_id in runs:
        run = await host.kernel.reads.get_run(run_id, with_stages=False)
        assert run.status is RunStatus.COMPLETED
        assert run.output == {"n": 3}


async def test_process_available_jobs_counts_failures(host: ServerlessHost) -> None:
    """A failed stage counts as processed and failed (its retry is scheduled, not due)."""
    await _start(host, "flaky")
    report = await host.process_available_jobs()
    assert (report.processed, report.succeeded, report.failed) == (1, 0, 1)
    assert report.outcomes[0].status == "failed"
    assert report.outcomes[0].retryable


async def test_process_available_jobs_stops_at_max_jobs(host: ServerlessHost) -> None:
    """``max_jobs`` bounds how many jobs one call starts."""
    await _start(host)
    await _start(host)
    report = await host.process_available_jobs(max_jobs=1)
    assert (report.processed, report.stopped) == (1, "max_jobs")
    assert (await host.process_available_jobs(max_jobs=0)).processed == 0
    with pytest.raises(ValueError, match="max_jobs"):
        await host.process_available_jobs(max_jobs="3")  # type: ignore[arg-type]


async def test_process_available_jobs_releases_at_the_deadline(
    backend: Backend,
) -> None:
    """At the deadline no new job starts and running ones are released, not counted as
    processed."""
    host = ServerlessHost(
        (await ServerlessHost.open("memory://", [BLOCKING, TWO], backend=backend)).kernel,
        concurrency=2,
    )
    await _start(host, "blocking")
    await _start(host, "blocking")
    report = await host.process_available_jobs(deadline=0.05)
    assert (report.processed, report.released, report.stopped) == (0, 2, "deadline")
    assert {j.status for j in _jobs(backend).values()} == {JobStatus.QUEUED}


async def test_run_maintenance_tick_reports_every_step(host: ServerlessHost) -> None:
    """The tick report names each step in order with what it did."""
    await _start(host)
    report = await host.run_maintenance_tick()
    assert report.ok
    assert list(report.steps) == list(STEP_ORDER)
    assert report.claimed_runs == 1
    assert report.result("flush_outbox")["published"] >= 2


async def test_open_owns_and_closes_its_backend() -> None:
    """A host opened from a URL closes its backend on exit."""
    async with await ServerlessHost.open("memory://", [TWO]) as host:
        assert host.backend is not None
        assert isinstance(await host.handle_job({}), JobOutcome)
    assert host.backend is None


def test_concurrency_must_be_positive() -> None:
    """A bad concurrency fails at construction with the value named."""
    with pytest.raises(ValueError, match="concurrency must be a positive integer, got 0"):
        ServerlessHost(object(), concurrency=0)  # type: ignore[arg-type]


async def test_opening_creates_the_schedules_workflows_declare(backend: Backend) -> None:
    """A serverless host (the Lambda handler's) creates ``schedule=`` schedules when it
    opens, so a deployment without any long-running worker still fires them."""
    nightly = WorkflowBuilder("nightly", input=None, schedule="0 3 * * *").pipe(inc).build()
    host = await ServerlessHost.open("memory://", [nightly], backend=backend)
    (schedule,) = await host.kernel.schedules.list()
    assert (schedule.id, schedule.cron, schedule.declared) == ("nightly", "0 3 * * *", True)
