"""Payload offload on both dialects: large JSON values go to the BlobStore, the row keeps
a reference, reads are transparent, and a rolled-back transaction leaves nothing behind."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, WorkflowContext, define_stage, workflow
from treadle.adapters.sql import schema as t
from treadle.adapters.sql.payloads import PAYLOAD_REF
from treadle.kernel.errors import TreadleError
from treadle.kernel.model import Run, RunStatus

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
        await engine.close()


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
        await engine.close()
    reopened = await Engine.open(database_url, workflows=[BIG_OUT], payload_max_bytes=None)
    try:
        assert (await reopened.get_run(handle.run_id)).output == output
    finally:
        await reopened.close()


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
            await tx.insert_run(run)
            assert await tx.get_run(run.id) is not None  # visible inside, offloaded
            raise RuntimeError("abort")

    try:
        with pytest.raises(RuntimeError, match="abort"):
            await insert_then_fail()
        assert await engine.backend.blob_store.list("payloads/") == []
        assert await _raw(engine, sa.select(t.runs.c.id)) == []
        assert await _raw(engine, sa.select(t.blobs.c.key)) == []

        async with persistence.transaction() as tx:  # the same write, committed, works
            await tx.insert_run(run)
        async with persistence.transaction() as tx:
            stored = await tx.get_run(run.id)
        assert stored is not None
        assert stored.input == run.input
        assert len(await engine.backend.blob_store.list("payloads/")) == 1
    finally:
        await engine.close()


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
        await engine.close()


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
                await tx.insert_run(run)
            await tx.insert_stages(
                [StageRun(workflow_run_id=r.id, stage_id="s", execution_group=0) for r in runs]
            )
        async with persistence.transaction() as tx:
            got = await tx.get_runs(["r0", "r1"], for_update=True)
            stages = await tx.get_stages_of(["r0", "r1"])
            assert got["r0"].input == big
            new_runs = await tx.update_runs([evolve(r, {"output": big}) for r in got.values()])
            new_stages = await tx.update_stages(
                [
                    evolve(s[0], {"status": StageStatus.COMPLETED, "output": big})
                    for s in stages.values()
                ]
            )
        async with persistence.transaction() as tx:
            assert list((await tx.get_runs(["r0", "r1"])).values()) == new_runs
            assert [s[0] for s in (await tx.get_stages_of(["r0", "r1"])).values()] == new_stages
        outputs = await _raw(engine, sa.select(t.stages.c.output).order_by(t.stages.c.run_id))
        outputs += await _raw(engine, sa.select(t.runs.c.output))
        assert all(PAYLOAD_REF in output[0] for output in outputs)

        async with persistence.transaction() as tx:  # r1's stage moves on under the caller
            await tx.update_stage(evolve(new_stages[1], {"attempt": 2}))
        with pytest.raises(ConcurrencyError, match="'s' of run 'r1'") as raised:
            async with persistence.transaction() as tx:
                await tx.update_stages([evolve(s, {"error": "late"}) for s in new_stages])
        assert "run 'r0'" not in str(raised.value)
        async with persistence.transaction() as tx:
            assert (await tx.get_stages_of(["r0"]))["r0"] == [new_stages[0]]
    finally:
        await engine.close()
