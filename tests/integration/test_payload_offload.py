"""Payload offload on both dialects: large JSON values go to the BlobStore, the row keeps
a reference, reads are transparent, and a rolled-back transaction leaves nothing behind."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, WorkflowContext, define_stage, workflow
from treadle.adapters.sql import schema as t
from treadle.adapters.sql.payloads import PAYLOAD_REF
from treadle.kernel.errors import TreadleError
from treadle.kernel.model import Run, RunFilter, RunStatus, StageStatus, evolve

THRESHOLD = 4_096
BIG = 20_000


class Text(BaseModel):
    text: str


@define_stage(id="grow", input=Text, output=Text)
async def grow(ctx):  # type: ignore[no-untyped-def]
    return Text(text=ctx.input.text * (BIG // max(1, len(ctx.input.text)) + 1))


@define_stage(id="shrink", input=Text, output=Text)
async def shrink(ctx):  # type: ignore[no-untyped-def]
    return Text(text=ctx.input.text[:10])


WF = WorkflowBuilder("offload-wf", input=Text).pipe(grow).pipe(shrink).build()
BIG_OUT = WorkflowBuilder("offload-big-out", input=Text).pipe(grow).build()


async def big_text(size: int) -> str:
    return "z" * size


@workflow(id="offload-code", input=Text, output=int, version="1")
async def offload_code(ctx: WorkflowContext, start: Text) -> int:
    text = await ctx.step("big", big_text, BIG)
    more = await ctx.wait_for_signal("more", Text)
    return len(text) + len(more.text)


async def _raw(engine: Engine, query: Any) -> list[Any]:
    assert engine.backend is not None
    async with engine.backend.persistence.engine.connect() as conn:  # type: ignore[attr-defined]
        return list((await conn.execute(query)).all())


async def _payload_blobs(engine: Engine) -> list[str]:
    assert engine.backend is not None
    return await engine.backend.blob_store.list("payloads/")


async def test_large_outputs_round_trip_and_rows_hold_references(database_url: str) -> None:
    """A stage output past the threshold is a reference in the stages, runs and outbox rows,
    and the API returns the value itself."""
    engine = await Engine.open(
        database_url, workflows=[WF, BIG_OUT], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    try:
        async with engine.worker(concurrency=2):
            big_run = await engine.start("offload-big-out", {"text": "ab"})
            small_run = await engine.start("offload-wf", {"text": "ab"})
            output = await big_run.result(timeout=20)
            assert await small_run.result(timeout=20) == {"text": "ababababab"}
        assert len(output["text"]) > BIG
        run = await engine.get_run(big_run.run_id)
        assert run.output == output
        assert run.stages[0].output == output

        (run_output,) = await _raw(engine, sa.select(t.runs.c.output).where(t.runs.c.id == run.id))
        assert set(run_output[0]) == {PAYLOAD_REF, "size"}
        stage_rows = await _raw(
            engine, sa.select(t.stages.c.stage_id, t.stages.c.output).order_by(t.stages.c.run_id)
        )
        by_stage = {(sid, str(out)[:40]) for sid, out in stage_rows}
        assert any(PAYLOAD_REF in text for _, text in by_stage)
        events = await _raw(
            engine,
            sa.select(t.outbox.c.event_type, t.outbox.c.event).where(t.outbox.c.run_id == run.id),
        )
        completed = [event for kind, event in events if kind == "stage:completed"]
        assert completed
        assert PAYLOAD_REF in completed[0]

        # The small run's rows stay inline: only the grown output of its first stage is big.
        small = await engine.get_run(small_run.run_id)
        (small_output,) = await _raw(
            engine, sa.select(t.runs.c.output).where(t.runs.c.id == small.id)
        )
        assert small_output[0] == {"text": "ababababab"}

        typed = [e async for e in engine.events(run.id, follow=False)]
        stage_done = [e for e in typed if e.type == "stage:completed"]
        assert stage_done[0].output == output  # type: ignore[attr-defined]
        assert await _payload_blobs(engine)  # the blobs really are in the store
    finally:
        await engine.aclose()


async def test_raising_the_threshold_still_reads_old_references(database_url: str) -> None:
    """Reopening with offload disabled reads the references written before."""
    engine = await Engine.open(
        database_url, workflows=[BIG_OUT], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    try:
        async with engine.worker(concurrency=1):
            handle = await engine.start("offload-big-out", {"text": "xyz"})
            output = await handle.result(timeout=20)
    finally:
        await engine.aclose()
    reopened = await Engine.open(database_url, workflows=[BIG_OUT], payload_max_bytes=None)
    try:
        assert (await reopened.get_run(handle.run_id)).output == output
    finally:
        await reopened.aclose()


async def test_rollback_leaves_no_row_and_no_blob(database_url: str) -> None:
    """A transaction that offloaded a payload and then failed leaves neither the run row nor
    the blob behind."""
    engine = await Engine.open(
        database_url, workflows=[WF], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    assert engine.backend is not None
    persistence = engine.backend.persistence
    now = datetime.now(UTC)
    run = Run(
        id="run-rolled-back",
        workflow_id="offload-wf",
        workflow_version="1",
        status=RunStatus.PENDING,
        input={"text": "y" * BIG},
        created_at=now,
        updated_at=now,
    )

    async def insert_then_fail() -> None:
        async with persistence.transaction() as tx:
            await tx.runs.insert(run)
            assert await tx.runs.get(run.id) is not None  # visible inside, offloaded
            raise RuntimeError("abort")

    try:
        with pytest.raises(RuntimeError, match="abort"):
            await insert_then_fail()
        assert await engine.backend.blob_store.list("payloads/") == []
        assert await _raw(engine, sa.select(t.runs.c.id)) == []
        assert await _raw(engine, sa.select(t.blobs.c.key)) == []

        async with persistence.transaction() as tx:  # the same write, committed, works
            await tx.runs.insert(run)
        async with persistence.transaction() as tx:
            stored = await tx.runs.get(run.id)
        assert stored is not None
        assert stored.input == run.input
        assert len(await engine.backend.blob_store.list("payloads/")) == 1
    finally:
        await engine.aclose()


async def test_invalid_threshold_is_refused(sqlite_url: str) -> None:
    """payload_max_bytes must be a positive integer or None."""
    with pytest.raises(TreadleError, match="payload_max_bytes"):
        await Engine.open(sqlite_url, workflows=[WF], payload_max_bytes=0)


async def test_code_workflow_journal_and_signal_payloads_are_offloaded(database_url: str) -> None:
    """A large step result and a large signal payload are references in the journal and
    inbox rows; the workflow sees the values."""
    engine = await Engine.open(
        database_url, workflows=[offload_code], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    try:
        async with engine.worker(concurrency=2):
            handle = await engine.start("offload-code", {"text": "go"})
            assert await engine.signal(handle.run_id, "more", {"text": "q" * BIG})
            assert await handle.result(timeout=20) == 2 * BIG
        results = await _raw(
            engine, sa.select(t.journal.c.result).where(t.journal.c.step_name == "big")
        )
        assert results
        assert PAYLOAD_REF in results[0][0]
        (payload,) = await _raw(engine, sa.select(t.signal_inbox.c.payload))
        assert PAYLOAD_REF in payload[0]
    finally:
        await engine.aclose()


async def test_set_oriented_reads_and_updates_offload_like_the_single_row_ones(
    database_url: str,
) -> None:
    """``get_runs``, ``get_stages_of``, ``update_runs`` and ``update_stages`` (the group-commit
    forms) store big payloads as references and read them back as values, and a stale item
    among offloaded ones is still told apart from those the call wrote."""
    from treadle.kernel.errors import ConcurrencyError
    from treadle.kernel.model import StageRun, StageStatus, evolve

    engine = await Engine.open(
        database_url, workflows=[WF], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    assert engine.backend is not None
    persistence = engine.backend.persistence
    now = datetime.now(UTC)
    big = {"text": "q" * BIG}
    runs = [
        Run(id=f"r{i}", workflow_id="offload-wf", input=big, created_at=now, updated_at=now)
        for i in range(2)
    ]
    try:
        async with persistence.transaction() as tx:
            for run in runs:
                await tx.runs.insert(run)
            await tx.stages.insert_many(
                [StageRun(workflow_run_id=r.id, stage_id="s", execution_group=0) for r in runs]
            )
        async with persistence.transaction() as tx:
            got = await tx.runs.get_many(["r0", "r1"], for_update=True)
            stages = await tx.stages.for_runs(["r0", "r1"])
            assert got["r0"].input == big
            new_runs = await tx.runs.update_many([evolve(r, {"output": big}) for r in got.values()])
            new_stages = await tx.stages.update_many(
                [
                    evolve(s[0], {"status": StageStatus.COMPLETED, "output": big})
                    for s in stages.values()
                ]
            )
        async with persistence.transaction() as tx:
            assert list((await tx.runs.get_many(["r0", "r1"])).values()) == new_runs
            assert [s[0] for s in (await tx.stages.for_runs(["r0", "r1"])).values()] == new_stages
        outputs = await _raw(engine, sa.select(t.stages.c.output).order_by(t.stages.c.run_id))
        outputs += await _raw(engine, sa.select(t.runs.c.output))
        assert all(PAYLOAD_REF in output[0] for output in outputs)

        async with persistence.transaction() as tx:  # r1's stage moves on under the caller
            await tx.stages.update(evolve(new_stages[1], {"attempt": 2}))
        with pytest.raises(ConcurrencyError, match="'s' of run 'r1'") as raised:
            async with persistence.transaction() as tx:
                await tx.stages.update_many([evolve(s, {"error": "late"}) for s in new_stages])
        assert "run 'r0'" not in str(raised.value)
        async with persistence.transaction() as tx:
            assert (await tx.stages.for_runs(["r0"]))["r0"] == [new_stages[0]]
    finally:
        await engine.aclose()


# -- user values shaped like references; blobs that went missing --------------------------
# The issue's value, verbatim: a plain dict a user may pass as workflow input. It must be
# stored and returned as that value on every backend, never read as a reference.
FORGED = {"__treadle_blob__": "payloads/none/none", "size": 1}
SETTLE = 20  # seconds a worker gets to finish a handful of tiny runs


@define_stage(id="echo", input=dict[str, Any], output=dict[str, Any])
async def echo(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


@define_stage(id="need-grow", input="none", output=Text)
async def need_grow(ctx):  # type: ignore[no-untyped-def]
    return Text(text=ctx.require("grow").text[:5])


ECHO = WorkflowBuilder("echo-wf", input=dict[str, Any]).pipe(echo).build()
REQUIRE = WorkflowBuilder("offload-require", input=Text).pipe(grow).pipe(need_grow).build()


async def forge(value: dict[str, Any]) -> dict[str, Any]:
    return dict(value)


@workflow(id="forged-code", input=dict[str, Any], output=dict[str, Any], version="1")
async def forged_code(ctx: WorkflowContext, value: dict[str, Any]) -> dict[str, Any]:
    step = await ctx.step("forge", forge, value)
    signal = await ctx.wait_for_signal("forged", dict[str, Any])
    return {"input": value, "step": step, "signal": signal}


WORKFLOWS = [WF, BIG_OUT, ECHO, REQUIRE, forged_code]


class Harness:
    """The same steps on ``TestEngine`` (memory) and on ``Engine.open`` (SQLite,
    PostgreSQL, offloading past ``THRESHOLD``)."""

    def __init__(self, kind: str, engine: Any) -> None:
        self.kind = kind
        self.engine = engine

    async def start(self, workflow_id: str, value: Any) -> str:
        handle = await self.engine.start(workflow_id, value)
        return str(handle.run_id)

    async def signal(self, run_id: str, name: str, payload: Any) -> None:
        assert await self.engine.signal(run_id, name, payload)

    async def cancel(self, run_id: str) -> bool:
        return bool(await self.engine.cancel(run_id))

    async def rerun_from(self, run_id: str, stage_id: str) -> None:
        if self.kind == "memory":
            await self.engine.dispatch(
                {"type": "run.rerunFrom", "workflow_run_id": run_id, "from_stage_id": stage_id}
            )
        else:
            await self.engine.rerun_from(run_id, stage_id)

    async def finish(self, *run_ids: str) -> None:
        """Drive the runs until each is terminal (memory: until idle)."""
        from treadle.kernel.errors import RunCancelledError, RunFailedError

        if self.kind == "memory":
            await self.engine.run_until_idle()
            return
        async with self.engine.worker(concurrency=4):
            for run_id in run_ids:
                with contextlib.suppress(RunFailedError, RunCancelledError):
                    await self.engine.handle(run_id).result(timeout=SETTLE)

    async def get_run(self, run_id: str) -> Run:
        return await self.engine.get_run(run_id)  # type: ignore[no-any-return]

    async def list_runs(self) -> list[Run]:
        if self.kind == "memory":
            return await self.engine.kernel.reads.list_runs(RunFilter(limit=100))  # type: ignore[no-any-return]
        return await self.engine.list(limit=100)  # type: ignore[no-any-return]

    async def journal(self, run_id: str) -> list[Any]:
        return await self.engine.journal(run_id)  # type: ignore[no-any-return]

    async def payload_keys(self, run_id: str) -> list[str]:
        if self.kind == "memory":
            return []
        return await self.engine.backend.blob_store.list(f"payloads/{run_id}/")  # type: ignore[no-any-return]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        from treadle.testing import TestEngine

        yield Harness("memory", TestEngine(workflows=WORKFLOWS))
        return
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    engine = await Engine.open(
        url, workflows=WORKFLOWS, auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    try:
        yield Harness(request.param, engine)
    finally:
        await engine.aclose()


async def test_the_issue_dict_round_trips_as_input_output_signal_and_step_result(
    harness: Harness,
) -> None:
    """``{"__treadle_blob__": ..., "size": 1}`` is stored and returned as itself: as run
    input and output, stage output, signal payload and step result."""
    pipeline = await harness.start("echo-wf", FORGED)
    code = await harness.start("forged-code", FORGED)
    await harness.signal(code, "forged", FORGED)
    await harness.finish(pipeline, code)

    run = await harness.get_run(pipeline)
    assert run.status is RunStatus.COMPLETED, run.error
    assert (run.input, run.output, run.stages[0].output) == (FORGED, FORGED, FORGED)
    code_run = await harness.get_run(code)
    assert code_run.status is RunStatus.COMPLETED, code_run.error
    assert code_run.input == FORGED
    assert code_run.output == {"input": FORGED, "step": FORGED, "signal": FORGED}
    steps = [e for e in await harness.journal(code) if e.kind == "step"]
    assert [e.result for e in steps] == [FORGED]


async def test_a_forged_reference_to_another_runs_data_comes_back_verbatim(
    harness: Harness,
) -> None:
    """A run whose input names another run's offloaded payload key or artifact key gets
    that value as its input and output, never the other run's data."""
    victim = await harness.start("offload-wf", {"text": "v" * BIG})
    await harness.finish(victim)
    keys = await harness.payload_keys(victim)
    payload_key = keys[0] if keys else f"payloads/{victim}/0"  # memory: nothing offloaded
    forged = [
        {"__treadle_blob__": payload_key, "size": 1},
        {"__treadle_blob__": f"runs/{victim}/stages/grow/artifacts/out", "size": 1},
    ]
    thieves = [await harness.start("echo-wf", value) for value in forged]
    await harness.finish(*thieves)
    for run_id, value in zip(thieves, forged, strict=True):
        run = await harness.get_run(run_id)
        assert run.status is RunStatus.COMPLETED, run.error
        assert (run.input, run.output) == (value, value)


async def test_a_queued_forged_run_stops_no_claim_list_get_or_cancel(harness: Harness) -> None:
    """With runs whose input looks like a reference queued first, listing, reading and
    cancelling work, and every other run is claimed and completes."""
    forged = [await harness.start("echo-wf", FORGED) for _ in range(2)]
    healthy = [await harness.start("offload-wf", {"text": f"t{i}"}) for i in range(5)]
    listed = {run.id: run for run in await harness.list_runs()}
    assert set(listed) == {*forged, *healthy}
    assert listed[forged[0]].input == FORGED
    assert (await harness.get_run(forged[0])).input == FORGED
    assert await harness.cancel(forged[1])

    await harness.finish(*healthy, forged[0])
    for run_id in healthy:
        assert (await harness.get_run(run_id)).status is RunStatus.COMPLETED
    assert (await harness.get_run(forged[0])).output == FORGED
    assert (await harness.get_run(forged[1])).status is RunStatus.CANCELLED


async def _lose_payloads(harness: Harness, run_id: str) -> None:
    """Lose the stored blob of ``run_id``'s input: SQL backends delete the offloaded blob
    (the row keeps its reference); memory, which never offloads, stores what the SQL
    adapter reads back for a reference whose blob is gone."""
    if harness.kind != "memory":
        assert harness.engine.backend is not None
        keys = await harness.payload_keys(run_id)
        assert keys, "the input was not offloaded"
        for key in keys:
            await harness.engine.backend.blob_store.delete(key)
        return
    from treadle.kernel.model import MissingPayload

    persistence = harness.engine.persistence
    async with persistence.transaction() as tx:
        run = await tx.runs.get(run_id, for_update=True)
        missing = MissingPayload(key=f"payloads/{run_id}/gone", size=1, run_id=run_id)
        await tx.runs.update(evolve(run, {"input": missing}))


async def test_a_missing_input_blob_fails_only_its_run_with_a_named_error(
    harness: Harness,
) -> None:
    """A run whose offloaded input blob is gone ends FAILED with ``PayloadMissingError``
    naming the run and the key when claimed; another such run can still be cancelled,
    listed and read, and every other run completes."""
    lost = [await harness.start("offload-wf", {"text": "m" * BIG}) for _ in range(2)]
    for run_id in lost:
        await _lose_payloads(harness, run_id)
    healthy = [await harness.start("offload-wf", {"text": f"t{i}"}) for i in range(4)]
    assert {run.id for run in await harness.list_runs()} == {*lost, *healthy}
    assert (await harness.get_run(lost[1])).status is RunStatus.PENDING
    assert await harness.cancel(lost[1])

    await harness.finish(*healthy, lost[0])
    for run_id in healthy:
        assert (await harness.get_run(run_id)).status is RunStatus.COMPLETED
    failed = await harness.get_run(lost[0])
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None
    assert failed.error.startswith("PayloadMissingError:")
    assert lost[0] in failed.error
    assert f"payloads/{lost[0]}/" in failed.error
    assert (await harness.get_run(lost[1])).status is RunStatus.CANCELLED


async def _lose_stage_output(harness: Harness, run_id: str, stage_id: str) -> None:
    if harness.kind != "memory":
        backend = harness.engine.backend
        query = sa.select(t.stages.c.output).where(
            t.stages.c.run_id == run_id, t.stages.c.stage_id == stage_id
        )
        ((output,),) = await _raw(harness.engine, query)
        assert PAYLOAD_REF in output
        await backend.blob_store.delete(output[PAYLOAD_REF])
        return
    from treadle.kernel.model import MissingPayload

    async with harness.engine.persistence.transaction() as tx:
        stage = await tx.stages.get(run_id, stage_id)
        missing = MissingPayload(key=f"payloads/{run_id}/gone", size=1, run_id=run_id)
        await tx.stages.update(evolve(stage, {"output": missing}))


@pytest.mark.parametrize(
    ("workflow_id", "consumer"), [("offload-wf", "shrink"), ("offload-require", "need-grow")]
)
async def test_a_missing_stage_output_fails_the_stage_that_reads_it(
    harness: Harness, workflow_id: str, consumer: str
) -> None:
    """A stage whose input (or ``ctx.require``d output) was offloaded and lost fails, not
    retried, with ``PayloadMissingError``; so does its run, and no other."""
    run_id = await harness.start(workflow_id, {"text": "ab"})
    other = await harness.start(workflow_id, {"text": "cd"})
    await harness.finish(run_id, other)
    assert (await harness.get_run(run_id)).status is RunStatus.COMPLETED
    await _lose_stage_output(harness, run_id, "grow")

    await harness.rerun_from(run_id, consumer)
    await harness.rerun_from(other, consumer)
    await harness.finish(run_id, other)
    run = await harness.get_run(run_id)
    assert run.status is RunStatus.FAILED
    (stage,) = [s for s in run.stages if s.stage_id == consumer]
    assert stage.status is StageStatus.FAILED
    assert stage.retryable is False
    assert stage.error is not None
    assert stage.error.startswith("PayloadMissingError:")
    assert (await harness.get_run(other)).status is RunStatus.COMPLETED


async def test_a_missing_step_result_fails_its_code_workflow_run(database_url: str) -> None:
    """A code workflow whose journaled step result was offloaded and lost fails at its next
    activation with ``PayloadMissingError``, at once rather than after retries."""
    from treadle.kernel.errors import RunFailedError

    engine = await Engine.open(
        database_url, workflows=[offload_code, WF], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    try:
        async with engine.worker(concurrency=2):
            handle = await engine.start("offload-code", {"text": "go"})
            async for event in engine.events(handle.run_id, follow=True, poll_interval=0.05):
                if event.type == "workflow:suspended":  # the step is journaled; it waits
                    break
            query = sa.select(t.journal.c.result).where(t.journal.c.run_id == handle.run_id)
            ((result,),) = await _raw(engine, query.where(t.journal.c.step_name == "big"))
            assert engine.backend is not None
            await engine.backend.blob_store.delete(result[PAYLOAD_REF])
            # The body parked here holds the step's result already: the activation that
            # needs the lost value is a replay (a restart, another worker).
            engine.kernel.close()
            assert await engine.signal(handle.run_id, "more", {"text": "q"})
            with pytest.raises(RunFailedError, match="PayloadMissingError") as failed:
                await handle.result(timeout=SETTLE)
            other = await engine.start("offload-wf", {"text": "ok"})
            assert await other.result(timeout=SETTLE) == {"text": ("ok" * (BIG // 2 + 1))[:10]}
        assert result[PAYLOAD_REF] in str(failed.value)
        run = await engine.get_run(handle.run_id)
        assert run.stages[0].attempt == 2  # the first activation and the failed one
    finally:
        await engine.aclose()


async def test_a_parked_body_does_not_read_a_lost_step_result_again(database_url: str) -> None:
    """Sticky execution: the body parked on this worker took the step's result when the
    step ran, so the next wake-up here, which reads only the journal from the parked
    position on, completes the run although the result's blob is gone since."""
    engine = await Engine.open(
        database_url, workflows=[offload_code], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    try:
        async with engine.worker(concurrency=2):
            handle = await engine.start("offload-code", {"text": "go"})
            async for event in engine.events(handle.run_id, follow=True, poll_interval=0.05):
                if event.type == "workflow:suspended":
                    break
            query = sa.select(t.journal.c.result).where(t.journal.c.run_id == handle.run_id)
            ((result,),) = await _raw(engine, query.where(t.journal.c.step_name == "big"))
            assert engine.backend is not None
            await engine.backend.blob_store.delete(result[PAYLOAD_REF])
            assert await engine.signal(handle.run_id, "more", {"text": "q"})
            assert await handle.result(timeout=SETTLE) == BIG + 1
        assert engine.kernel.deps.sticky.hits == 1
    finally:
        await engine.aclose()


async def test_a_missing_signal_payload_fails_the_run_that_waits_for_it(
    database_url: str,
) -> None:
    """A signal whose offloaded payload was lost before the body took it fails that run
    with ``PayloadMissingError``; the outbox event that carried it is dead-lettered."""
    from treadle.kernel.errors import RunFailedError

    engine = await Engine.open(
        database_url, workflows=[offload_code], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    assert engine.backend is not None
    try:
        handle = await engine.start("offload-code", {"text": "go"})
        assert await engine.signal(handle.run_id, "more", {"text": "q" * BIG})
        for key in await engine.backend.blob_store.list(f"payloads/{handle.run_id}/"):
            await engine.backend.blob_store.delete(key)
        async with engine.worker(concurrency=2):
            with pytest.raises(RunFailedError, match="PayloadMissingError"):
                await handle.result(timeout=SETTLE)
        async with engine.backend.persistence.transaction() as tx:  # as outbox.flush reads
            pending = await tx.outbox.unpublished(100)
        async with engine.backend.persistence.transaction() as tx:
            dead = await tx.outbox.dead_lettered(100)
        assert all(r.event.type != "signal:received" for r in pending)
        assert dead == []  # its event cannot be read back: not replayed either
        query = sa.select(t.outbox.c.event_type, t.outbox.c.last_error).where(
            t.outbox.c.dead_lettered.is_(True)
        )
        rows = await _raw(engine, query)
        assert [kind for kind, _ in rows] == ["signal:received"]
        assert rows[0][1].startswith("PayloadMissingError:")
    finally:
        await engine.aclose()


async def test_a_lost_blob_reads_as_missing_payload_and_is_written_back_unchanged(
    database_url: str,
) -> None:
    """Run and stage reads (single and set-oriented) give a ``MissingPayload`` for a value
    whose blob is gone, never an error; writing the rows back (single and set-oriented
    updates) keeps the reference, so the value reads again once the blob is restored."""
    from treadle.kernel.model import MissingPayload, StageRun

    engine = await Engine.open(
        database_url, workflows=[WF], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    assert engine.backend is not None
    persistence, blobs = engine.backend.persistence, engine.backend.blob_store
    now = datetime.now(UTC)
    big = {"text": "l" * BIG}
    ids = ["lost-a", "lost-b", "kept"]
    try:
        async with persistence.transaction() as tx:
            for run_id in ids:
                await tx.runs.insert(
                    Run(
                        id=run_id,
                        workflow_id="offload-wf",
                        input=big,
                        created_at=now,
                        updated_at=now,
                    )
                )
            await tx.stages.insert_many(
                [
                    StageRun(
                        workflow_run_id=run_id,
                        stage_id="grow",
                        execution_group=0,
                        status=StageStatus.SUSPENDED,
                        output=big,
                        next_poll_at=now,
                    )
                    for run_id in ids
                ]
            )
        saved = {}
        for run_id in ids[:2]:
            (key,) = await blobs.list(f"payloads/{run_id}/")
            saved[key] = await blobs.get(key)
            await blobs.delete(key)
        stored = await _raw(engine, sa.select(t.runs.c.id, t.runs.c.input).order_by(t.runs.c.id))

        async with persistence.transaction() as tx:
            reads = [
                await tx.runs.get_many(ids),
                {r.id: r for r in await tx.runs.query(RunFilter())},
                {r.id: r for r in await tx.runs.claim_pending(10)},
                {run_id: await tx.runs.get(run_id) for run_id in ids},
            ]
            stage_reads = [
                {k: v[0] for k, v in (await tx.stages.for_runs(ids)).items()},
                {s.workflow_run_id: s for s in await tx.stages.due_suspended(now, 10)},
            ]
        for got in reads:
            assert got["kept"].input == big
            for run_id in ids[:2]:
                value = got[run_id].input
                assert type(value) is MissingPayload
                assert value.run_id == run_id
                assert value.key in saved
                assert value.error().key == value.key
        for stages in stage_reads:
            assert stages["kept"].output == big
            assert type(stages["lost-a"].output) is MissingPayload

        async with persistence.transaction() as tx:
            runs = await tx.runs.get_many(ids, for_update=True)
            await tx.runs.update(evolve(runs["lost-a"], {"status": RunStatus.CANCELLED}))
            await tx.runs.update_many(
                [evolve(runs[r], {"priority": 9}) for r in ("lost-b", "kept")]
            )
            stages = await tx.stages.for_runs(ids)
            await tx.stages.update_many([evolve(s[0], {"attempt": 3}) for s in stages.values()])
        async with persistence.transaction() as tx:  # another transaction: no identity map
            runs = await tx.runs.get_many(ids)
            await tx.runs.update_many([evolve(run, {"priority": 7}) for run in runs.values()])
        assert (
            await _raw(engine, sa.select(t.runs.c.id, t.runs.c.input).order_by(t.runs.c.id))
            == stored
        )

        for key, data in saved.items():
            await blobs.put(key, data)
        async with persistence.transaction() as tx:
            again = await tx.runs.get_many(ids)
            stages = await tx.stages.for_runs(ids)
        assert [again[r].input for r in ids] == [big, big, big]
        assert [stages[r][0].output for r in ids] == [big, big, big]
        assert [stages[r][0].attempt for r in ids] == [3, 3, 3]
        assert again["lost-a"].status is RunStatus.CANCELLED
    finally:
        await engine.aclose()


async def test_a_lost_suspended_state_fails_the_batch_stage_at_its_next_poll() -> None:
    """A suspended batch stage whose stored state is a ``MissingPayload`` fails at its next
    poll with ``PayloadMissingError``, without calling its check."""
    from treadle import Ready, Suspend, define_batch_stage
    from treadle.kernel.model import MissingPayload
    from treadle.testing import TestEngine

    checks: list[Any] = []

    @define_batch_stage(id="batch", input=Text, output=Text)
    async def batch(ctx):  # type: ignore[no-untyped-def]
        return Suspend(state={"job": ctx.input.text}, poll_interval=timedelta(minutes=1))

    @batch.check_completion
    async def check(state, ctx):  # type: ignore[no-untyped-def]
        checks.append(state)
        return Ready(output={"text": "done"})

    te = TestEngine([WorkflowBuilder("batch-wf", input=Text).pipe(batch).build()])
    lost = await te.start("batch-wf", {"text": "a"})
    kept = await te.start("batch-wf", {"text": "b"})
    await te.run_until_idle()
    async with te.persistence.transaction() as tx:
        stage = await tx.stages.get(lost.run_id, "batch")
        assert stage is not None
        gone = MissingPayload(key=f"payloads/{lost.run_id}/gone", size=3, run_id=lost.run_id)
        await tx.stages.update(evolve(stage, {"suspended_state": gone}))
    await te.advance_time(timedelta(minutes=1))
    run = await te.get_run(lost.run_id)
    assert run.status is RunStatus.FAILED
    assert run.stages[0].error is not None
    assert run.stages[0].error.startswith("PayloadMissingError:")
    assert await kept.result() == {"text": "done"}
    assert checks == [{"job": "b"}]


async def test_result_of_a_run_whose_output_blob_is_lost_raises_the_named_error(
    database_url: str,
) -> None:
    """``handle.result()`` of a completed run whose offloaded output is gone raises
    ``PayloadMissingError``; ``get_run`` still answers, with a ``MissingPayload``."""
    from treadle import PayloadMissingError
    from treadle.kernel.model import MissingPayload

    engine = await Engine.open(
        database_url, workflows=[BIG_OUT], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    assert engine.backend is not None
    try:
        async with engine.worker(concurrency=1):
            handle = await engine.start("offload-big-out", {"text": "ab"})
            await handle.result(timeout=SETTLE)
        query = sa.select(t.runs.c.output).where(t.runs.c.id == handle.run_id)
        ((output,),) = await _raw(engine, query)
        await engine.backend.blob_store.delete(output[PAYLOAD_REF])
        with pytest.raises(PayloadMissingError) as raised:
            await handle.result(timeout=SETTLE)
        assert (raised.value.run_id, raised.value.key) == (handle.run_id, output[PAYLOAD_REF])
        run = await engine.get_run(handle.run_id)
        assert run.status is RunStatus.COMPLETED
        assert run.output == MissingPayload(
            key=output[PAYLOAD_REF], size=output["size"], run_id=handle.run_id
        )
    finally:
        await engine.aclose()


async def test_an_unescaped_row_naming_a_key_outside_payloads_is_not_a_reference(
    database_url: str,
) -> None:
    """A row written before escaping existed, whose input names an artifact key (or no
    string key at all), is user data: read verbatim, never as that blob."""
    engine = await Engine.open(
        database_url, workflows=[WF], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    assert engine.backend is not None
    persistence = engine.backend.persistence
    now = datetime.now(UTC)
    artifact = "runs/victim/stages/grow/artifacts/out"
    await engine.backend.blob_store.put(artifact, b'{"secret": 1}')
    legacy = [{"__treadle_blob__": artifact, "size": 1}, {"__treadle_blob__": 7, "size": 1}]
    try:
        async with persistence.transaction() as tx:
            for i in range(len(legacy)):
                await tx.runs.insert(
                    Run(id=f"old{i}", workflow_id="offload-wf", created_at=now, updated_at=now)
                )
        async with persistence.engine.begin() as conn:  # as an older Treadle stored them
            for i, value in enumerate(legacy):
                stmt = sa.update(t.runs).where(t.runs.c.id == f"old{i}").values(input=value)
                await conn.execute(stmt)
        async with persistence.transaction() as tx:
            got = await tx.runs.get_many([f"old{i}" for i in range(len(legacy))])
        assert [got[f"old{i}"].input for i in range(len(legacy))] == legacy
    finally:
        await engine.aclose()


async def test_every_payload_blob_is_referenced_by_a_row(database_url: str) -> None:
    """An event large enough for the blob store is stored once, with its sequence number:
    on PostgreSQL the one-statement append steps aside before storing anything, so no
    blob is left behind that no row refers to."""
    engine = await Engine.open(
        database_url, workflows=[BIG_OUT], auto_migrate=True, payload_max_bytes=THRESHOLD
    )
    try:
        async with engine.worker(concurrency=1):
            handle = await engine.start("offload-big-out", {"text": "ab"})
            await handle.result(timeout=20)
        referenced: set[str] = set()
        for table, column in (
            (t.runs, t.runs.c.output),
            (t.stages, t.stages.c.output),
            (t.outbox, t.outbox.c.event),
        ):
            for (value,) in await _raw(engine, sa.select(column).select_from(table)):
                if isinstance(value, dict) and PAYLOAD_REF in value:
                    referenced.add(value[PAYLOAD_REF])
        events = [e async for e in engine.events(handle.run_id, follow=False)]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert referenced
        assert set(await _payload_blobs(engine)) == referenced
    finally:
        await engine.aclose()
