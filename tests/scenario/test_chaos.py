"""Chaos: with a share of commits failing, every run still completes exactly once."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.kernel.errors import TransientStorageError
from treadle.kernel.model import JobStatus, RunStatus
from treadle.testing import TestEngine, with_chaos


class In(BaseModel):
    n: int


class Score(BaseModel):
    value: int


@define_stage(id="extract", input=In, output=In, retry=RetryPolicy(max_attempts=10))
async def extract(ctx):  # type: ignore[no-untyped-def]
    ctx.progress(0.5)
    ctx.log("info", "extracting")
    return In(n=ctx.input.n + 1)


@define_stage(id="left", input=In, output=Score, retry=RetryPolicy(max_attempts=10))
def left(ctx):  # type: ignore[no-untyped-def]
    return Score(value=ctx.input.n * 2)


@define_stage(id="right", input=In, output=Score, retry=RetryPolicy(max_attempts=10))
async def right(ctx):  # type: ignore[no-untyped-def]
    ctx.annotate({"seen": True})
    return Score(value=ctx.input.n * 3)


@define_stage(id="total", input="none", output=Score, retry=RetryPolicy(max_attempts=10))
async def total(ctx):  # type: ignore[no-untyped-def]
    return Score(value=ctx.require("left").value + ctx.require("right").value)


WF = WorkflowBuilder("chaos", input=In).pipe(extract).parallel([left, right]).pipe(total).build()


@pytest.mark.parametrize("seed", [1, 7, 42])
async def test_chaos_every_run_completes_exactly_once(seed: int) -> None:
    """With 15% of commits failing, 30 pipelines all complete with the right output,
    each stage result and each workflow:completed committed exactly once."""
    chaos = with_chaos(0.15, seed=seed)
    te = TestEngine([WF], chaos=chaos)
    handles = []
    for n in range(30):
        for _ in range(20):  # run.create itself may hit an injected failure
            try:
                handles.append((n, await te.start("chaos", {"n": n}, idempotency_key=f"r{n}")))
                break
            except TransientStorageError:
                continue
        else:
            pytest.fail("run.create kept failing")
    await te.advance_time(3600)
    chaos.fail_rate = 0.0  # reads below go through the same persistence
    assert chaos.injected > 0
    assert te.transient_failures > 0
    assert len(te.persistence.runs) == 30
    for n, handle in handles:
        run = await te.get_run(handle.run_id)
        assert run.status is RunStatus.COMPLETED, (run.status, run.error)
        assert run.output == {"value": (n + 1) * 5}
        assert run.search_attributes == {"seen": True}
        stored = Counter(e.type for e in await te.kernel.reads.events(handle.run_id))  # type: ignore[attr-defined]
        assert stored["workflow:completed"] == 1
        assert stored["stage:completed"] == 4
        assert stored["annotation:created"] == 1
        seqs = [e.sequence for e in await te.kernel.reads.events(handle.run_id)]
        assert seqs == list(range(1, len(seqs) + 1))
        published = Counter(e.type for e in te.event_sink.of_run(handle.run_id))  # type: ignore[attr-defined]
        assert published["workflow:completed"] >= 1
        logs = await te.logs(handle.run_id)
        assert [r.message for r in logs] == ["extracting"]
    assert all(j.status is JobStatus.COMPLETED for j in te.job_transport.jobs.values())


def test_with_chaos_rejects_bad_rates() -> None:
    """fail_rate must be within [0, 1)."""
    with pytest.raises(ValueError, match="fail_rate"):
        with_chaos(1.0)
