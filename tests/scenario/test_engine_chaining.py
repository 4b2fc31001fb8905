"""TestEngine chains stages as the production worker does (``JobExecute.chain``), unless
built with ``chain=False``: what each mode does to execution order, dequeues and the
records a test reads (mocks, events, attempts)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.kernel.model import JobStatus, RunStatus
from treadle.testing import TestEngine, with_chaos


class N(BaseModel):
    n: int


ORDER: list[tuple[int, str]] = []


def _stage(stage_id: str) -> Any:
    # Ten attempts: a stage may lose several commits in a row to injected failures.
    @define_stage(id=stage_id, input=N, output=N, retry=RetryPolicy(max_attempts=10))
    async def body(ctx):  # type: ignore[no-untyped-def]
        ORDER.append((ctx.input.n, stage_id))
        return ctx.input

    return body


TWO = WorkflowBuilder("two", input=N).pipe(_stage("a")).pipe(_stage("b")).build()


@pytest.fixture(autouse=True)
def _clear() -> None:
    ORDER.clear()


class _CountingDequeue:
    def __init__(self, te: TestEngine) -> None:
        self.leased = 0
        inner = te.job_transport.dequeue

        async def dequeue(*args: Any, **kwargs: Any) -> Any:
            jobs = await inner(*args, **kwargs)
            self.leased += len(jobs)
            return jobs

        te.job_transport.dequeue = dequeue  # type: ignore[method-assign]


async def test_chains_by_default_like_the_worker() -> None:
    """The commit of ``a`` leases and starts ``b`` for the same worker: ``b`` runs in the
    same task, before the next run's ``a``, and is never dequeued."""
    te = TestEngine([TWO])
    assert te.chain is True
    dequeues = _CountingDequeue(te)
    low = await te.start("two", {"n": 1}, priority=1)
    high = await te.start("two", {"n": 2}, priority=9)
    await te.run_until_idle()
    assert ORDER == [(2, "a"), (2, "b"), (1, "a"), (1, "b")]
    assert dequeues.leased == 2  # only the first stage of each run
    for handle in (low, high):
        run = await te.get_run(handle.run_id)
        assert run.status is RunStatus.COMPLETED
        assert [s.attempt for s in run.stages] == [1, 1]
    # The chained start is recorded as a started stage like any other, right after the
    # previous stage's completion.
    types = [e.type for e in te.events if e.workflow_run_id == high.run_id]
    i = types.index("stage:completed")
    assert types[i : i + 2] == ["stage:completed", "stage:started"]
    assert all(j.status is JobStatus.COMPLETED for j in te.job_transport.jobs.values())


async def test_chain_false_dequeues_every_stage_in_priority_order() -> None:
    """``chain=False``: every stage waits for the next round's dequeue, so the queue's
    priority order holds at every step (the chain skips it for one step, as documented
    for the worker)."""
    te = TestEngine([TWO], chain=False)
    dequeues = _CountingDequeue(te)
    await te.start("two", {"n": 1}, priority=1)
    await te.start("two", {"n": 2}, priority=9)
    await te.run_until_idle()
    assert ORDER == [(2, "a"), (1, "a"), (2, "b"), (1, "b")]
    assert dequeues.leased == 4


@pytest.mark.parametrize("chain", [True, False])
async def test_mock_records_and_retries_are_the_same_either_way(chain: bool) -> None:
    """A mocked stage sees the same calls, attempts and inputs with or without chaining,
    including a retry of a chained stage."""
    te = TestEngine([TWO], chain=chain)
    failures = iter([RuntimeError("flaky")])

    def flaky(ctx: Any) -> N:
        err = next(failures, None)
        if err is not None:
            raise err
        return N(n=ctx.input.n * 10)

    mock = te.mock_stage("b", flaky)
    handle = await te.start("two", {"n": 3})
    await te.advance_time(3600)
    assert await handle.result() == {"n": 30}
    assert [call.attempt for call in mock.calls] == [1, 2]
    assert [call.input.n for call in mock.calls] == [3, 3]


async def test_chained_stages_under_chaos_complete_exactly_once() -> None:
    """Transient storage failures around chained commits (the chained start is in the
    failing commit, or the chained job's own commit fails and it is released): every
    run still completes and each stage commits one result."""
    chaos = with_chaos(0.2, seed=11)
    chaos.fail_rate = 0.0
    te = TestEngine([TWO], chaos=chaos)
    handles = [await te.start("two", {"n": i}) for i in range(20)]
    chaos.fail_rate = 0.2
    await te.advance_time(3600)
    chaos.fail_rate = 0.0
    assert te.transient_failures > 0
    for handle in handles:
        run = await te.get_run(handle.run_id)
        assert run.status is RunStatus.COMPLETED, (run.status, run.error)
        stored = [e.type for e in await te.kernel.reads.events(handle.run_id)]  # type: ignore[attr-defined]
        assert stored.count("stage:completed") == 2
        assert stored.count("workflow:completed") == 1
    assert all(j.status is JobStatus.COMPLETED for j in te.job_transport.jobs.values())
