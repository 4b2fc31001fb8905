"""Kernel plumbing: create_kernel wiring, replays of every keyed command, ids, the
default logger, cancellation tokens and small model helpers."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, create_kernel, define_stage
from treadle.kernel import CancellationToken, SequentialIds, Uuid7Ids
from treadle.kernel import commands as c
from treadle.kernel.errors import DuplicateError
from treadle.kernel.logging import StdlibLogger
from treadle.kernel.model import Run
from treadle.testing import (
    CollectingEventSink,
    FakeClock,
    InMemoryBlobStore,
    InMemoryJobTransport,
    InMemoryPersistence,
    InMemoryScheduler,
    TestEngine,
)


class In(BaseModel):
    n: int


@define_stage(id="s", input=In, output=In)
async def s(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


WF = WorkflowBuilder("wf", input=In).pipe(s).build()


async def test_create_kernel_with_iterable_registry_and_default_ids() -> None:
    """create_kernel accepts a list of definitions and defaults to clock-stamped uuid7."""
    persistence = InMemoryPersistence()
    clock = FakeClock()
    kernel = create_kernel(
        persistence=persistence,
        job_transport=InMemoryJobTransport(persistence),
        blob_store=InMemoryBlobStore(),
        event_sink=CollectingEventSink(),
        scheduler=InMemoryScheduler(),
        clock=clock,
        registry=[WF],
    )
    result = await kernel.dispatch(c.RunCreate(workflow_id="wf", input={"n": 1}))
    run = await kernel.reads.get_run(result.workflow_run_id, with_stages=False)
    assert run.stages == []
    assert run.id[14] == "7"  # uuid version nibble
    assert [r.id for r in await kernel.reads.list_runs()] == [run.id]


async def test_deterministic_ids_through_test_engine() -> None:
    """TestEngine accepts an id generator; SequentialIds gives prefix-000001 ..."""
    te = TestEngine([WF], ids=SequentialIds("t"))
    handle = await te.start("wf", {"n": 1})
    assert handle.run_id == "t-000001"
    await te.run_until_idle()
    assert list(te.job_transport.jobs) == ["t-000002"]


def test_uuid7_ids_are_ordered_within_one_millisecond() -> None:
    """uuid7 ids from one generator sort in creation order even within a millisecond."""
    clock = FakeClock()
    ids = Uuid7Ids(clock.now)
    made = [ids.new_id() for _ in range(5000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    clock.advance(1)
    later = ids.new_id()
    assert later > made[-1]


@pytest.mark.parametrize(
    "command",
    [
        c.RunClaimPending(worker_id="w", idempotency_key="k"),
        c.StagePollSuspended(idempotency_key="k"),
        c.LeaseReapStale(idempotency_key="k"),
        c.RunReapStuck(idempotency_key="k"),
        c.OutboxFlush(idempotency_key="k"),
        c.PluginReplayDLQ(idempotency_key="k"),
    ],
    ids=lambda cmd: cmd.type,
)
async def test_keyed_maintenance_commands_replay_cached_results(command: Any) -> None:
    """A keyed command's replay returns the first result even after state changed."""
    te = TestEngine([WF])
    await te.start("wf", {"n": 1})
    first = await te.dispatch(command)
    await te.start("wf", {"n": 2})
    te.clock.advance(timedelta(hours=2))
    assert await te.dispatch(command) == first


async def test_keyed_run_commands_replay_cached_results() -> None:
    """run.transition and run.rerunFrom replays return the cached result."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await handle.result()
    transition = c.RunTransition(workflow_run_id=handle.run_id, idempotency_key="t")
    assert (await te.dispatch(transition)).action == "noop"
    rerun = c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="s", idempotency_key="r")
    first = await te.dispatch(rerun)
    assert await te.dispatch(rerun) == first
    await handle.result()
    assert (await te.dispatch(transition)).action == "noop"
    assert te.event_sink.types(handle.run_id).count("workflow:started") == 2


async def test_duplicate_run_id_is_rejected() -> None:
    """run.create with an existing run_id raises DuplicateError, keyed or not."""
    te = TestEngine([WF])
    await te.start("wf", {"n": 1}, run_id="fixed")
    with pytest.raises(DuplicateError):
        await te.start("wf", {"n": 1}, run_id="fixed")
    with pytest.raises(DuplicateError):
        await te.start("wf", {"n": 1}, run_id="fixed", idempotency_key="other")
    assert list(te.persistence.runs) == ["fixed"]


def test_stdlib_logger_formats_bound_fields(caplog: pytest.LogCaptureFixture) -> None:
    """The default kernel logger forwards to logging with bound fields appended."""
    logger = StdlibLogger("treadle.test").bind(run_id="r1")
    with caplog.at_level(logging.DEBUG, logger="treadle.test"):
        logger.debug("d", a=1)
        logger.info("i")
        logger.warning("w")
        logger.error("e", stage_id="s")
    assert [r.getMessage() for r in caplog.records] == [
        "d run_id=r1 a=1",
        "i run_id=r1",
        "w run_id=r1",
        "e run_id=r1 stage_id=s",
    ]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="treadle.test"):
        logger.info("dropped")
    assert caplog.records == []


async def test_cancellation_token() -> None:
    """A token starts clear, and cancel() records the reason and wakes waiters."""
    token = CancellationToken()
    assert not token
    assert not token.is_set()
    waiter = asyncio.create_task(token.wait())
    await asyncio.sleep(0)
    token.cancel("stop")
    await waiter
    assert token
    assert token.is_set()
    assert token.reason == "stop"
    token.cancel("later")
    assert token.reason == "stop"  # the first reason is kept


def test_command_type_helper() -> None:
    """command_type reads the type of a command model or mapping, else None."""
    assert c.command_type(c.OutboxFlush()) == "outbox.flush"
    assert c.command_type({"type": "run.cancel"}) == "run.cancel"
    assert c.command_type({"type": 3}) is None
    assert c.command_type("run.cancel") is None


def test_run_duration_needs_both_ends() -> None:
    """Run.duration is None until the run has both started and completed."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    run = Run(id="r", workflow_id="wf", created_at=now, updated_at=now)
    assert run.duration is None
    done = run.model_copy(update={"started_at": now, "completed_at": now + timedelta(seconds=3)})
    assert done.duration == timedelta(seconds=3)


def test_inflight_tokens_are_cancelled_by_run_or_by_job_while_tracked() -> None:
    """run.cancel sets the tokens of a run's executions in this process (not those of the
    compensating one), a lost job sets its own token, and nothing is kept afterwards."""
    from treadle.kernel.context import InFlight

    inflight = InFlight()
    forward, other, undoing = CancellationToken(), CancellationToken(), CancellationToken()
    with (
        inflight.track("j1", "r1", forward),
        inflight.track("j2", "r2", other),
        inflight.track("j3", "r1", undoing, by_run=False),
    ):
        assert inflight.cancel_run("r1", "stop") == 1
        assert (bool(forward), forward.reason, bool(other), bool(undoing)) == (
            True,
            "stop",
            False,
            False,
        )
        assert inflight.cancel_job("j3", "lease lost")
        assert undoing.reason == "lease lost"
    assert not inflight.cancel_job("j2")
    assert inflight.cancel_run("r2") == 0
    assert not other
