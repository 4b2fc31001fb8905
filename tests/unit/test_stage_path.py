"""Session 8's shortcuts on every stage's path keep the contracts of what they replace:
chained ``job.execute`` commands built without validation, the in-memory event feed kept
as two lists, the stage found at its noted index, a sequence stage's input read from the
stage before it, the in-flight token registered without a context manager object, the
in-memory idempotency store built on first use, and a model output's dump checked from
its keys."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.context import CancellationToken, InFlight
from treadle.kernel.errors import OutputValidationError, TreadleError
from treadle.kernel.events import WorkflowCreated
from treadle.kernel.handlers.common import group_input, lost_input
from treadle.kernel.handlers.execution import Started, validate_output
from treadle.kernel.handlers.jobs import _index_of, _stage_input
from treadle.kernel.model import Job, MissingPayload, Run, StageRun, StageStatus
from treadle.testing import InMemoryPersistence, TestEngine

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class _N(BaseModel):
    n: int


def _stage(stage_id: str):  # type: ignore[no-untyped-def]
    @define_stage(id=stage_id, input=_N, output=_N)
    async def body(ctx):  # type: ignore[no-untyped-def]
        return _N(n=ctx.input.n + 1)

    return body


def _pipeline(*stage_ids: str):  # type: ignore[no-untyped-def]
    builder = WorkflowBuilder("seq", input=_N)
    for stage_id in stage_ids:
        builder = builder.pipe(_stage(stage_id))
    return builder.build()


async def test_chained_commands_equal_validated_ones_and_the_first_is_validated() -> None:
    """Each chained stage's ``job.execute`` is built without validation: it equals what
    validating its fields gives, and carries no idempotency key. The call's first command
    is still validated, so a bad worker id is refused before anything runs."""
    engine = TestEngine([_pipeline("a", "b", "c")])
    seen: list[Any] = []
    dispatch = engine.kernel.dispatch

    async def recording(command: Any) -> Any:
        seen.append(command)
        return await dispatch(command)

    engine.kernel.dispatch = recording  # type: ignore[method-assign]
    handle = await engine.start("seq", {"n": 0})
    assert await handle.result() == {"n": 3}
    executed = [cmd for cmd in seen if isinstance(cmd, c.JobExecute)]
    assert len(executed) == 3
    for cmd in executed:
        assert cmd == c.JobExecute(**cmd.model_dump())
    assert [cmd.idempotency_key is None for cmd in executed[1:]] == [True, True]

    from treadle.runtime.jobs import _command

    job = Job(
        id="j1", workflow_run_id="r", workflow_id="w", stage_id="s", next_poll_at=NOW,
        enqueued_at=NOW,
    )  # fmt: skip
    with pytest.raises(ValueError, match="worker_id"):
        _command(engine.kernel, job, "", chain=True, chained=False)


async def test_event_feed_keeps_ids_and_events_and_rolls_back() -> None:
    """The feed holds ids and events in two lists (no pair per event), reads back as
    ``(id, event)`` pairs, and a rolled-back append leaves the feed, each run's events and
    its sequence as they were."""
    p = InMemoryPersistence()

    def created(run_id: str) -> WorkflowCreated:
        return WorkflowCreated(workflow_run_id=run_id, timestamp=NOW, workflow_id="w", priority=5)

    async with p.transaction() as tx:
        first = await tx.outbox.append([created("a"), created("b"), created("a")])
    assert p.feed.ids == [1, 2, 3]
    assert all(type(i) is int for i in p.feed.ids)

    async def append_then_fail() -> None:
        async with p.transaction() as tx:
            await tx.outbox.append([created("a"), created("c"), created("a")])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await append_then_fail()
    async with p.transaction() as tx:
        assert await tx.outbox.events_after(0, 10) == list(zip([1, 2, 3], first, strict=True))
        assert await tx.outbox.events_after(1, 1) == [(2, first[1])]
        assert await tx.outbox.last_event_id() == 3
        assert await tx.outbox.events_for_run("a") == [first[0], first[2]]
        assert await tx.outbox.events_for_run("c") == []
        again = await tx.outbox.append([created("a"), created("c")])
    assert [(e.workflow_run_id, e.sequence) for e in again] == [("a", 3), ("c", 1)]
    # Row ids are not given back (as a SQL sequence's are not): only the rows are gone.
    assert p.feed.ids[:3] == [1, 2, 3]
    assert len(p.feed.ids) == 5
    assert p.feed.ids == sorted(p.feed.ids)


def _stages(n: int, **changes: Any) -> list[StageRun]:
    return [
        StageRun(
            workflow_run_id="r",
            stage_id=f"s{i}",
            execution_group=i,
            status=StageStatus.COMPLETED,
            output={"n": i},
        )
        for i in range(n)
    ]


def test_index_of_checks_the_hint_and_falls_back_to_a_search() -> None:
    stages = _stages(5)
    assert _index_of(stages, "s3", 3) == 3
    assert _index_of(stages, "s3", 1) == 3  # a wrong hint: found anyway
    assert _index_of(stages, "s3", 9) == 3  # out of range
    assert _index_of(stages, "s3") == 3
    assert _index_of(stages, "nope", 2) == -1


def _started(stages: list[StageRun], index: int, run_input: object = None) -> Started:
    wf = _pipeline(*(s.stage_id for s in stages))
    run = Run(
        id="r", workflow_id="seq", input=run_input, created_at=NOW, updated_at=NOW,
        status="RUNNING",
    )  # fmt: skip
    stage = stages[index]
    job = Job(
        id="j", workflow_run_id="r", workflow_id="seq", stage_id=stage.stage_id,
        next_poll_at=NOW, enqueued_at=NOW,
    )  # fmt: skip
    return Started(job, run, stage, wf, wf.stages[stage.stage_id], stages, index=index)


@pytest.mark.parametrize(
    "case",
    ["completed", "previous offloaded", "resume offloaded", "previous pending", "no hint", "first"],
)
def test_stage_input_is_group_input_and_lost_input(case: str) -> None:
    """What ``_stage_input`` reads directly from the stage before equals what
    ``group_input`` and ``lost_input`` find by walking the run's stages."""
    stages = _stages(4)
    index = 2
    if case == "previous offloaded":
        stages[1] = stages[1].model_copy(update={"output": MissingPayload("k1", run_id="r")})
    elif case == "resume offloaded":
        stages[2] = stages[2].model_copy(update={"resume_state": MissingPayload("k2", run_id="r")})
    elif case == "previous pending":
        stages[1] = stages[1].model_copy(update={"status": StageStatus.PENDING})
    elif case == "first":
        index = 0
    started = _started(stages, index, run_input={"n": 7})
    if case == "no hint":
        started.index = -1
    group = stages[index].execution_group
    wf, run = started.wf, started.run
    expected_input = run.input if group == 0 else group_input(wf, stages, group)
    expected_lost = lost_input(run, stages, stages[index])
    raw, lost = _stage_input(started)
    if expected_lost is not None:
        assert lost is not None
        assert str(lost) == str(expected_lost)
    else:
        assert lost is None
        assert raw == expected_input


def test_inflight_add_and_remove_as_track_does() -> None:
    """``add`` registers a token that a cancel of the run reaches; ``remove`` drops it only
    if no other execution of the job registered since (as ``track``'s exit)."""
    inflight = InFlight()
    first, second = CancellationToken(), CancellationToken()
    inflight.add("j", "r", first)
    assert inflight.cancel_run("r", "stop") == 1
    assert first.is_set()
    assert first.reason == "stop"
    inflight.add("j", "r", second)  # a newer execution of the same job
    inflight.remove("j", first)  # the older one's exit leaves the newer registered
    assert inflight.cancel_job("j")
    inflight.remove("j", second)
    assert not inflight.cancel_job("j")
    inflight.add("k", None, CancellationToken())  # not by run (compensations)
    assert inflight.cancel_run("r") == 0


async def test_lazily_built_idempotency_store_refuses_writes_after_the_end() -> None:
    from treadle.kernel.model import IdempotencyRecord, IdempotencyState

    p = InMemoryPersistence()
    async with p.transaction() as tx:
        store = tx.idempotency
        assert tx.idempotency is store  # built once, then a plain attribute
    record = IdempotencyRecord(
        key="k", command_type="t", state=IdempotencyState.IN_PROGRESS, started_at=NOW
    )
    with pytest.raises(TreadleError, match="after it ended"):
        await store.put(record)
    assert p.idempotency == {}


class _Nested(BaseModel):
    inner: dict[str, str]


def test_an_unstorable_dump_still_names_its_path() -> None:
    """A model output whose dump breaks a storage rule is refused with the path of the
    offending value, as before the dump was checked from its keys."""

    @define_stage(id="bad", input=_N, output=_Nested)
    async def bad(ctx):  # type: ignore[no-untyped-def]
        return _Nested(inner={"key": "a\x00b"})

    with pytest.raises(OutputValidationError, match=r"output\.inner\.key: contains a NUL"):
        validate_output(bad, _Nested(inner={"key": "a\x00b"}))
    assert validate_output(bad, _Nested(inner={"key": "ok"})) == {"inner": {"key": "ok"}}
