"""``RunHandle.result`` wakes when its run ends instead of polling storage: in the same
process on every backend (the adapter tells the engine after the commit), and across
processes on PostgreSQL (``NOTIFY`` on the run's end). Polling is made useless here
(the first poll waits a minute), so only the wake-up can answer in time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, StageContext, WorkflowBuilder, define_stage
from treadle import engine as engine_module
from treadle.tests.scenario.helpers import WAIT, worker


class N(BaseModel):
    n: int


GATES: dict[int, asyncio.Event] = {}


@define_stage(id="held", input=N, output=N)
async def held(ctx: StageContext[N, None]) -> N:
    """Waits for the test's gate of its input, if there is one."""
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


@pytest.mark.usefixtures("no_polling")
async def test_result_wakes_when_the_run_ends_in_this_process(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter reads the run once (RUNNING), sleeps, and is woken by the commit that
    completes it: two reads in all, and an answer long before the next poll."""
    GATES[1] = gate = asyncio.Event()
    reads, first_read = _count_reads(engine, monkeypatch)
    async with worker(engine):
        handle = await engine.start("held", {"n": 1})
        waiting = asyncio.ensure_future(handle.result())
        await asyncio.wait_for(first_read.wait(), WAIT)  # RUNNING: the waiter now sleeps
        gate.set()
        assert await asyncio.wait_for(waiting, WAIT) == {"n": 1}
    assert reads == [handle.run_id, handle.run_id]


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
