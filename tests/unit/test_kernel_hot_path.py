"""The shortcuts taken on every stage's path keep the contracts of what they replace:
shared field sets, the class-based in-memory transaction, the level check before
structlog, the lazily made cancellation event, uuid7 text built without ``uuid`` from
blocks of randomness, models built without validation (``construct``), and a stage's
outputs and input read without building every stage's outputs."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.adapters.logging import structlog_logger
from treadle.kernel import commands as c
from treadle.kernel.context import CancellationToken
from treadle.kernel.events import WorkflowCreated, parse_event
from treadle.kernel.handlers.common import LazyOutputs, group_input, outputs_of
from treadle.kernel.ids import Uuid7Ids
from treadle.kernel.model import Job, JobStatus, Run, StageRun, StageStatus, construct, evolve
from treadle.testing import FakeClock, InMemoryJobTransport, InMemoryPersistence, TestEngine

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_evolved_copies_share_one_field_set_without_leaking_changes() -> None:
    """evolve shares one field set per frozen class; model_copy still copies it, so a
    later update of one copy never shows on another."""
    stage = StageRun(workflow_run_id="r", stage_id="s", execution_group=0)
    running = evolve(stage, {"status": StageStatus.RUNNING, "attempt": 1})
    done = evolve(running, {"status": StageStatus.COMPLETED})
    assert running.model_fields_set is done.model_fields_set
    assert running.model_fields_set == set(StageRun.model_fields)
    copied = done.model_copy(update={"attempt": 7})
    assert copied.attempt == 7
    assert copied.model_fields_set is not done.model_fields_set
    assert (running.attempt, done.attempt, done.status) == (1, 1, StageStatus.COMPLETED)
    assert stage.status is StageStatus.PENDING
    assert done == StageRun(
        workflow_run_id="r", stage_id="s", execution_group=0, status="COMPLETED", attempt=1
    )


def test_evolve_of_a_mutable_model_gets_its_own_field_set() -> None:
    """A mutable model may add to its field set on assignment, so it never shares one."""

    class Mutable(BaseModel):
        a: int = 0
        b: int = 0

    first = Mutable(a=1)
    second = evolve(first, {"b": 2})
    second.a = 5
    assert second.model_fields_set == {"a", "b"}
    assert first.model_fields_set == {"a"}
    assert first.a == 1


async def test_transaction_rolls_back_on_cancellation_and_releases_the_lock() -> None:
    """A task cancelled inside a transaction rolls it back; the next one starts at once."""
    p = InMemoryPersistence()
    entered = asyncio.Event()

    async def writer() -> None:
        async with p.transaction() as tx:
            await tx.runs.insert(Run(id="r1", workflow_id="wf", created_at=NOW, updated_at=NOW))
            entered.set()
            await asyncio.Event().wait()  # cancelled here, mid-transaction

    task = asyncio.create_task(writer())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (p.runs, p.rollbacks, p.commits) == ({}, 1, 0)
    assert not p.lock.locked()
    async with p.transaction() as tx:
        await tx.runs.insert(Run(id="r2", workflow_id="wf", created_at=NOW, updated_at=NOW))
        [stored] = await tx.outbox.append(
            [WorkflowCreated(workflow_run_id="r2", timestamp=NOW, workflow_id="wf", priority=5)]
        )
    assert stored.sequence == 1
    assert list(p.runs) == ["r2"]
    assert p.commits == 1


async def test_stages_inserted_out_of_group_order_roll_back_to_the_old_order() -> None:
    """Stages are kept in group order without sorting on read; a rolled-back insert that
    re-ordered them leaves the previous stages, in their previous order."""
    p = InMemoryPersistence()
    async with p.transaction() as tx:
        await tx.runs.insert(Run(id="r1", workflow_id="wf", created_at=NOW, updated_at=NOW))
        await tx.stages.insert_many(
            [
                StageRun(workflow_run_id="r1", stage_id="b", execution_group=2),
                StageRun(workflow_run_id="r1", stage_id="a", execution_group=0),
            ]
        )
        assert [s.stage_id for s in await tx.stages.for_run("r1")] == ["a", "b"]

    async def insert_then_fail() -> None:
        async with p.transaction() as tx:
            await tx.stages.insert_many(
                [StageRun(workflow_run_id="r1", stage_id="m", execution_group=1)]
            )
            assert [s.stage_id for s in await tx.stages.for_run("r1")] == ["a", "m", "b"]
            raise RuntimeError

    with pytest.raises(RuntimeError):
        await insert_then_fail()
    async with p.transaction() as tx:
        assert [s.stage_id for s in await tx.stages.for_run("r1")] == ["a", "b"]
    assert list(p.stages["r1"]) == ["a", "b"]


async def test_has_leased_follows_leases_and_rollbacks() -> None:
    """has_leased (the harness's per-round check) is true exactly while a job is leased,
    also after a rolled-back completion."""
    p = InMemoryPersistence()
    jobs = InMemoryJobTransport(p)
    job = Job(
        id="j1",
        workflow_run_id="r1",
        workflow_id="wf",
        stage_id="s",
        next_poll_at=NOW,
        enqueued_at=NOW,
    )
    async with p.transaction() as tx:
        await jobs.enqueue(tx, [job])
    assert not jobs.has_leased()
    await jobs.dequeue("w", NOW)
    assert jobs.has_leased()

    async def complete_then_fail() -> None:
        async with p.transaction() as tx:
            await jobs.complete(tx, "j1")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        await complete_then_fail()
    assert jobs.has_leased()
    async with p.transaction() as tx:
        await jobs.complete(tx, "j1")
    assert not jobs.has_leased()
    assert jobs.jobs["j1"].status is JobStatus.COMPLETED


def test_structlog_logger_checks_the_level_first(caplog: pytest.LogCaptureFixture) -> None:
    """Below the logger's level nothing is rendered; at or above it the line carries the
    bound and the call's fields."""
    log = structlog_logger("treadle.hotpath", worker_id="w1").bind(run_id="r1")
    with caplog.at_level(logging.WARNING, logger="treadle.hotpath"):
        log.info("stage.completed", stage_id="s")
        log.debug("noise")
        log.warning("stage.failed", stage_id="s", error="boom")
    [record] = [r for r in caplog.records if r.name == "treadle.hotpath"]
    line = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "event='stage.failed'" in line
    for field in ("run_id='r1'", "stage_id='s'", "worker_id='w1'", "error='boom'"):
        assert field in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="treadle.hotpath"):
        log.info("stage.completed", stage_id="s")
    assert [r.levelno for r in caplog.records if r.name == "treadle.hotpath"] == [logging.INFO]


async def test_cancellation_token_wakes_waiters_whenever_cancelled() -> None:
    """The token's event is made on first wait: cancelling before or after that wakes
    the waiter, and truthiness reflects the cancellation either way."""
    early = CancellationToken()
    early.cancel("stop")
    assert early
    assert early.is_set()
    assert early.reason == "stop"
    await asyncio.wait_for(early.wait(), 1)

    late = CancellationToken()
    assert not late
    waiter = asyncio.create_task(late.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    late.cancel()
    await asyncio.wait_for(waiter, 1)
    assert late.is_set()


def test_uuid7_text_is_the_canonical_uuid_form() -> None:
    """Ids are exactly what uuid.UUID prints: lower-case 8-4-4-4-12, version 7, RFC
    variant, whether the millisecond is new or repeated."""
    clock = FakeClock()
    ids = Uuid7Ids(clock.now)
    first_ms = int(clock.now().timestamp() * 1000)
    made = [ids.new_id() for _ in range(50)]
    clock.advance(1)
    made.append(ids.new_id())
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    assert {uuid.UUID(t).int >> 80 for t in made[:-1]} == {first_ms}
    assert uuid.UUID(made[-1]).int >> 80 == first_ms + 1000


def test_uuid7_ids_stay_unique_and_ordered_across_random_blocks() -> None:
    """The random bits come in blocks of 256 ids: more than a block's worth, within one
    millisecond and across the counter's wrap, are distinct and strictly increasing."""
    clock = FakeClock()
    ids = Uuid7Ids(clock.now)
    made = [ids.new_id() for _ in range(5000)]  # > 4096: the counter wraps into the next ms
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    assert all(uuid.UUID(t).version == 7 for t in made)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_reuse_the_parents_random_bits() -> None:
    clock = FakeClock()
    ids = Uuid7Ids(clock.now)
    ids.new_id()  # the parent holds a block of randomness now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, ids.new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.close(write_end)
    parent_id = ids.new_id()
    # Same clock and counter, so only the random tail tells them apart.
    assert child_id[:19] == parent_id[:19]
    assert child_id[19:] != parent_id[19:]


def test_construct_builds_what_validation_builds() -> None:
    """``construct`` skips validation only: defaults, field order, equality, repr and
    dumps match the validated model's, and a missing or unknown field still fails."""
    values: dict[str, object] = {
        "id": "j1",
        "workflow_run_id": "r1",
        "workflow_id": "wf",
        "stage_id": "a",
        "priority": 7,
        "max_attempts": 3,
        "next_poll_at": NOW,
        "enqueued_at": NOW,
        "status": JobStatus.LEASED,
    }
    built = construct(Job, values)
    validated = Job.model_validate(values)
    assert built == validated
    assert repr(built) == repr(validated)
    assert built.model_dump() == validated.model_dump()
    assert list(built.__dict__) == list(Job.model_fields)
    assert built.attempts == 0
    assert built.worker_id is None
    with pytest.raises(TypeError, match="missing \\['stage_id'\\]"):
        construct(Job, {k: v for k, v in values.items() if k != "stage_id"})
    with pytest.raises(TypeError, match="unknown \\['colour'\\]"):
        construct(Job, {**values, "colour": "red"})
    with pytest.raises(TypeError, match="default_factory"):
        construct(Run, {"id": "r", "workflow_id": "wf", "created_at": NOW, "updated_at": NOW})


class _N(BaseModel):
    n: int


class _BC(BaseModel):
    b: _N
    c: _N


def _stage(stage_id: str, input: type[BaseModel] = _N):  # type: ignore[no-untyped-def]
    @define_stage(id=stage_id, input=input, output=_N)
    async def body(ctx):  # type: ignore[no-untyped-def]
        return _N(n=ctx.input.n + 1) if isinstance(ctx.input, _N) else _N(n=0)

    return body


def _stage_run(stage_id: str, group: int, status: StageStatus, output: object) -> StageRun:
    return StageRun(
        workflow_run_id="r", stage_id=stage_id, execution_group=group, status=status, output=output
    )


def test_lazy_outputs_read_as_outputs_of_and_build_them_once() -> None:
    stages = [
        _stage_run("a", 0, StageStatus.COMPLETED, {"n": 1}),
        _stage_run("b", 1, StageStatus.RUNNING, None),
        _stage_run("c", 1, StageStatus.COMPLETED, None),
    ]
    lazy = LazyOutputs(stages)
    assert dict(lazy) == outputs_of(stages) == {"a": {"n": 1}, "c": None}
    assert lazy["a"] == {"n": 1}
    assert lazy.get("b") is None
    assert lazy.get("b", "default") == "default"
    assert "c" in lazy
    assert "b" not in lazy
    assert len(lazy) == 2
    with pytest.raises(KeyError):
        lazy["b"]
    assert lazy._built() is lazy._built()


def test_group_input_is_the_previous_groups_output() -> None:
    """``group_input`` reads what ``group_output`` over every stage's outputs gives: the
    single previous stage's output (``None`` unless it completed), or a dict for a
    parallel group."""
    wf = (
        WorkflowBuilder("gi", input=_N)
        .pipe(_stage("a"))
        .parallel([_stage("b"), _stage("c")])
        .pipe(_stage("d", _BC))
        .build()
    )
    done = [
        _stage_run("a", 0, StageStatus.COMPLETED, {"n": 1}),
        _stage_run("b", 1, StageStatus.COMPLETED, {"n": 2}),
        _stage_run("c", 1, StageStatus.COMPLETED, {"n": 3}),
        _stage_run("d", 2, StageStatus.PENDING, None),
    ]
    for group in (1, 2):
        expected = wf.group_output(group - 1, outputs_of(done))
        assert group_input(wf, done, group) == expected
    assert group_input(wf, done, 1) == {"n": 1}
    assert group_input(wf, done, 2) == {"b": {"n": 2}, "c": {"n": 3}}
    failed_a = [evolve(done[0], {"status": StageStatus.FAILED}), *done[1:]]
    assert group_input(wf, failed_a, 1) is None
    assert group_input(wf, done[1:], 1) is None  # no such stage stored


async def test_events_and_results_the_kernel_constructs_equal_validated_ones() -> None:
    """``stage:started``, ``stage:completed`` and the ``job.execute`` results are built
    without validation; each equals (and dumps like) what validating its data gives."""
    wf = WorkflowBuilder("ev", input=_N).pipe(_stage("a")).pipe(_stage("b")).build()
    engine = TestEngine([wf])
    handle = await engine.start("ev", {"n": 1})
    await engine.run_until_idle()
    events = engine.events
    types = [e.type for e in events]  # type: ignore[attr-defined]
    assert types.count("stage:started") == 2
    assert types.count("stage:completed") == 2
    for event in events:
        reparsed = parse_event(event.model_dump(mode="json"))
        assert reparsed == event
        assert list(reparsed.__dict__) == list(event.__dict__)
        assert reparsed.model_dump(mode="json") == event.model_dump(mode="json")
    run = await engine.get_run(handle.run_id)
    assert run.output == {"n": 3}
    first_result = engine.persistence.idempotency_record(
        f"job:{run.stages[0].job_id}:1", "job.execute"
    )
    assert first_result is not None
    result = c.JobExecuteResult.model_validate(first_result.result)
    assert result.outcome == "completed"
    assert result.output == {"n": 2}
    assert result.chained_job is not None
    assert result.chained_job.stage_id == "b"
