"""``RunHandle.result`` wakes when its run ends instead of polling storage: in the same
process on every backend (the adapter tells the engine after the commit), and across
processes on PostgreSQL (``NOTIFY`` on the run's end). Polling is made useless here
(the first poll waits a minute), so only the wake-up can answer in time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, NonRetryableError, StageContext, WorkflowBuilder, define_stage
from treadle import engine as engine_module
from treadle.tests.scenario.helpers import WAIT, worker


class N(BaseModel):
    n: int


GATES: dict[int, asyncio.Event] = {}


@define_stage(id="held", input=N, output=N)
async def held(ctx: StageContext[N, None]) -> N:
    """Waits for the test's gate of its input, if there is one."""
    if ctx.input.n < 0:
        raise NonRetryableError("negative input")
    gate = GATES.get(ctx.input.n)
    if gate is not None:
        await gate.wait()
    return ctx.input


WORKFLOWS = [WorkflowBuilder("held", input=N).pipe(held).build()]


@pytest.fixture
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll once, then not again for a minute: longer than any test waits."""
    monkeypatch.setattr(engine_module, "_RESULT_FIRST_POLL", 60.0)
    monkeypatch.setattr(engine_module, "_RESULT_MAX_POLL", 60.0)


def _count_reads(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], asyncio.Event]:
    """The run ids ``engine.get_run`` reads from now on, and an event set at the first."""
    reads: list[str] = []
    first = asyncio.Event()
    get_run = engine.get_run

    async def counted(run_id: str, **kw: Any) -> Any:
        reads.append(run_id)
        try:
            return await get_run(run_id, **kw)
        finally:
            first.set()

    monkeypatch.setattr(engine, "get_run", counted)
    return reads, first


async def _listening(engine: Engine) -> None:
    """On PostgreSQL, the engine's listener connected (and its catch-up wake-up, which
    re-reads every waiting run, done) before the test's waiter registers."""
    wake_source = engine.backend.wake_source if engine.backend else None
    if wake_source is not None:
        engine.run_waiters.forget("-", engine.run_waiters.waiter("-"))  # subscribes
        # The catch-up wake-up follows LISTEN in the listener's task without a pause.
        await wake_source.wait_listening()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("no_polling")
async def test_result_wakes_when_the_run_ends_in_this_process(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started before this process's worker (so not handed to it by the start):
    the waiter reads the run once (not finished), sleeps, and is woken by the commit that
    completes it: two reads in all, and an answer long before the next poll."""
    GATES[1] = gate = asyncio.Event()
    await _listening(engine)
    reads, first_read = _count_reads(engine, monkeypatch)
    handle = await engine.start("held", {"n": 1})  # no worker yet: PENDING, for any
    waiting = asyncio.ensure_future(handle.result())
    await asyncio.wait_for(first_read.wait(), WAIT)  # not finished: the waiter now sleeps
    async with worker(engine):
        gate.set()
        assert await asyncio.wait_for(waiting, WAIT) == {"n": 1}
    assert reads == [handle.run_id, handle.run_id]


@pytest.mark.usefixtures("no_polling")
async def test_a_run_started_for_this_processs_worker_answers_without_a_read(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run the start handed to this engine's worker: ``result`` neither reads it
    while it runs nor after; the commit that ends it brings its outcome. A second
    ``result`` of the same run reads it, as any later handle does."""
    GATES[3] = gate = asyncio.Event()
    reads, _ = _count_reads(engine, monkeypatch)
    async with worker(engine):
        handle = await engine.start("held", {"n": 3})
        waiting = asyncio.ensure_future(handle.result())
        await asyncio.sleep(0)  # the waiter is registered and asleep (nothing to read)
        gate.set()
        assert await asyncio.wait_for(waiting, WAIT) == {"n": 3}
        assert reads == []
        assert await asyncio.wait_for(handle.result(), WAIT) == {"n": 3}
    assert reads == [handle.run_id]


async def test_a_run_started_here_but_failing_answers_with_its_error(engine: Engine) -> None:
    """The outcome an ending commit brings is the run as written: a failed run raises
    ``RunFailedError`` with its error, as a read would."""
    from treadle import RunFailedError

    async with worker(engine):
        handle = await engine.start("held", {"n": -1})
        with pytest.raises(RunFailedError, match="negative"):
            await asyncio.wait_for(handle.result(), WAIT)


@pytest.mark.postgres
@pytest.mark.usefixtures("no_polling")
async def test_result_wakes_when_another_process_ends_the_run(
    treadle_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine with no worker waits on a run another engine (its own pool and
    listener, as another process would have) executes: the NOTIFY of the run's end
    wakes it."""
    GATES[2] = gate = asyncio.Event()
    async with (
        await Engine.open(treadle_postgres_url, workflows=WORKFLOWS) as runner,
        await Engine.open(treadle_postgres_url, workflows=WORKFLOWS) as waiter,
        worker(runner),
    ):
        handle = await waiter.start("held", {"n": 2})
        waiting = asyncio.ensure_future(waiter.handle(handle.run_id).result())
        wake_source = waiter.backend.wake_source if waiter.backend else None
        assert wake_source is not None
        await asyncio.sleep(0)  # let result() subscribe (which starts the listener)
        await wake_source.wait_listening()  # type: ignore[attr-defined]
        gate.set()
        assert await asyncio.wait_for(waiting, WAIT) == {"n": 2}
