"""Continue-as-new (issue 14, section 6): ``ctx.continue_as_new(input)`` ends a code
workflow run and continues the logical workflow as a new run with a fresh journal, in
one transaction. On memory, a SQLite file and PostgreSQL through ``Engine.open`` and an
in-process worker; the TestEngine cases are in ``test_continue_as_new_harness.py``."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from treadle import Engine, RunStatus, WorkflowContext, workflow
from treadle.kernel import events as ev
from treadle.kernel.errors import RunCancelledError, RunFailedError, TreadleValidationError
from treadle.tests.scenario.helpers import WAIT, run_events, until, until_status, worker


class Tally(BaseModel):
    total: int = 0
    remaining: int
    per_run: int


class Add(BaseModel):
    n: int


@workflow(id="tally", input=Tally, output=int, signals={"add": Add})
async def tally(ctx: WorkflowContext, state: Tally) -> int:
    """Sums ``remaining`` signals, ``per_run`` per run, then continues as new."""
    total, remaining = state.total, state.remaining
    for _ in range(min(state.per_run, remaining)):
        add: Add = await ctx.wait_for_signal("add", Add)
        total, remaining = total + add.n, remaining - 1
    if remaining:
        ctx.continue_as_new(Tally(total=total, remaining=remaining, per_run=state.per_run))
    return total


AFTER: list[str] = []


async def mark(label: str) -> str:
    AFTER.append(label)
    return label


class Hops(BaseModel):
    left: int


@workflow(id="hops", input=Hops, output=str)
async def hops(ctx: WorkflowContext, hop: Hops) -> str:
    if hop.left:
        ctx.set_attribute(f"hop{hop.left}", True)
        ctx.continue_as_new({"left": hop.left - 1})
        await ctx.step("never", mark, "after continue_as_new")  # pragma: no cover
    return "landed"


async def continue_inside(ctx: WorkflowContext) -> None:
    ctx.continue_as_new({"left": 0})


@workflow(id="in-step", input=Hops, output=str)
async def in_step(ctx: WorkflowContext, hop: Hops) -> str:
    await ctx.step("sneaky", continue_inside, ctx)
    return "unreachable"


@workflow(id="bad-continue", input=Hops, output=str)
async def bad_continue(ctx: WorkflowContext, hop: Hops) -> str:
    ctx.continue_as_new({"left": "many"})


class Ask(BaseModel):
    q: str


@workflow(id="answerer", input=Hops, output=str, updates={"ask": Ask})
async def answerer(ctx: WorkflowContext, hop: Hops) -> str:
    request = await ctx.wait_for_update("ask", Ask)
    await request.reply(f"run {hop.left} answers {request.payload.q}")
    if hop.left:
        ctx.continue_as_new({"left": hop.left - 1})
    return "done"


@workflow(id="hop-parent", input=Hops, output=str)
async def hop_parent(ctx: WorkflowContext, hop: Hops) -> str:
    result: str = await ctx.child("hops", hop)
    return f"child {result}"


WORKFLOWS = [tally, hops, in_step, bad_continue, answerer, hop_parent]


@pytest.fixture(autouse=True)
def _reset() -> None:
    AFTER.clear()


async def _chain(engine: Engine, run_id: str) -> list[str]:
    """The run ids of the chain from ``run_id``, oldest first."""
    ids = [run_id]
    while (run := await engine.get_run(ids[-1], with_stages=False)).continued_as:
        ids.append(run.continued_as)
    return ids


async def test_a_chain_answers_the_first_handle_and_links_both_ways(engine: Engine) -> None:
    """The first run's handle gets the chain's result; each link names the next and the
    previous run, keeps the search attributes, priority and workflow id."""
    handle = await engine.start(
        "hops", {"left": 2}, priority=7, search_attributes={"tenant": "acme"}
    )
    async with worker(engine):
        assert await handle.result(timeout=WAIT) == "landed"
    ids = await _chain(engine, handle.run_id)
    assert len(ids) == 3
    first, middle, last = [await engine.get_run(i) for i in ids]
    assert (first.status, first.output, first.continued_from) == (RunStatus.COMPLETED, None, None)
    assert (middle.continued_from, middle.continued_as) == (first.id, last.id)
    assert (last.continued_from, last.continued_as, last.output) == (middle.id, None, "landed")
    assert {r.workflow_id for r in (first, middle, last)} == {"hops"}
    assert {r.priority for r in (first, middle, last)} == {7}
    assert last.search_attributes == {
        "tenant": "acme",
        "hop2": True,
        "hop1": True,
        "continued_from": middle.id,
    }
    assert AFTER == []  # the code after continue_as_new never ran
    ended = [e for e in await run_events(engine, first.id) if e.type == "workflow:continuedAsNew"]  # type: ignore[attr-defined]
    assert len(ended) == 1
    assert isinstance(ended[0], ev.WorkflowContinuedAsNew)
    assert ended[0].continued_as == middle.id
    assert not [e for e in await run_events(engine, first.id) if e.type == "workflow:completed"]  # type: ignore[attr-defined]
    found = await engine.list(workflow_id="hops", attributes={"continued_from": first.id})
    assert [r.id for r in found] == [middle.id]


async def test_signals_reach_the_current_run_by_key_and_by_an_old_id(engine: Engine) -> None:
    """``start_or_signal`` with the idempotency key reaches the newest run; a signal
    sent to an old run id is forwarded; signals not consumed when a run continues move
    to the new run; ``start`` with the key still finds the logical workflow."""
    key = "tally-1"
    state = {"remaining": 5, "per_run": 2}
    handle = await engine.start_or_signal("tally", state, "add", {"n": 1}, idempotency_key=key)
    for n in (2, 3):  # all in the first run's inbox before it runs: one is left over
        await engine.start_or_signal("tally", state, "add", {"n": n}, idempotency_key=key)
    async with worker(engine):

        async def third_run() -> bool:
            return len(await _chain(engine, handle.run_id)) == 2

        await until(third_run)
        ids = await _chain(engine, handle.run_id)
        assert (await engine.get_run(ids[0])).idempotency_key is None
        assert (await engine.get_run(ids[-1])).idempotency_key == key
        again = await engine.start_or_signal("tally", state, "add", {"n": 4}, idempotency_key=key)
        assert again.run_id == ids[-1]
        assert await engine.signal(handle.run_id, "add", {"n": 5})  # an old id: forwarded
        assert await handle.result(timeout=WAIT) == 15
    restarted = await engine.start("tally", state, idempotency_key=key)
    assert await restarted.result(timeout=WAIT) == 15
    ids = await _chain(engine, handle.run_id)
    assert len(ids) == 3
    runs = [r for r in await engine.list(workflow_id="tally") if r.idempotency_key == key]
    assert [r.id for r in runs] == [ids[-1]]


async def test_calling_it_inside_a_step_fails_the_run_naming_the_step(engine: Engine) -> None:
    """Inside a step, ``continue_as_new`` is an error naming the step; no run is made."""
    handle = await engine.start("in-step", {"left": 1})
    async with worker(engine):
        with pytest.raises(RunFailedError, match="inside step 'sneaky'"):
            await handle.result(timeout=WAIT)
    assert len(await engine.list(workflow_id="in-step")) == 1
    assert (await engine.get_run(handle.run_id)).continued_as is None


async def test_bad_input_fails_the_run_naming_the_field(engine: Engine) -> None:
    """Input that does not match the model raises in the body, naming the field; the
    run fails and no continuation is created."""
    handle = await engine.start("bad-continue", {"left": 1})
    async with worker(engine):
        with pytest.raises(RunFailedError, match=r"input\.left"):
            await handle.result(timeout=WAIT)
    await until_status(engine, handle.run_id, RunStatus.FAILED)
    assert len(await engine.list(workflow_id="bad-continue")) == 1


async def test_the_links_are_reserved_search_attributes(engine: Engine) -> None:
    """A start cannot forge a link: ``continued_from`` is Treadle's, and refused."""
    with pytest.raises(TreadleValidationError, match="continued_from"):
        await engine.start("hops", {"left": 0}, search_attributes={"continued_from": "x"})
    assert await engine.list(workflow_id="hops") == []


async def test_an_update_to_an_old_run_id_is_forwarded_and_answered(engine: Engine) -> None:
    """``engine.update`` to a run that continued reaches the newest run and returns its
    reply."""
    handle = await engine.start("answerer", {"left": 1})
    async with worker(engine):
        assert await engine.update(handle.run_id, "ask", {"q": "a"}, timeout=WAIT) == (
            "run 1 answers a"
        )

        async def continued() -> bool:
            return (await engine.get_run(handle.run_id, with_stages=False)).continued_as is not None

        await until(continued)
        reply = await engine.update(handle.run_id, "ask", {"q": "b"}, timeout=WAIT)
        assert reply == "run 0 answers b"
        assert await handle.result(timeout=WAIT) == "done"


async def test_a_parent_gets_the_result_of_its_childs_chain(engine: Engine) -> None:
    """A child that continues as new stays the parent's child to the chain's end."""
    handle = await engine.start("hop-parent", {"left": 2})
    async with worker(engine):
        assert await handle.result(timeout=WAIT) == "child landed"
    children = await engine.list(workflow_id="hops")
    assert len(children) == 3
    assert {r.parent_run_id for r in children} == {handle.run_id}


async def test_cancelling_an_old_run_id_cancels_the_chain(engine: Engine) -> None:
    """``cancel`` with the first run's id cancels the chain's newest run; the first
    handle then raises ``RunCancelledError``."""
    handle = await engine.start("tally", {"remaining": 4, "per_run": 1})
    await engine.signal(handle.run_id, "add", {"n": 1})
    async with worker(engine):

        async def continued() -> bool:
            return len(await _chain(engine, handle.run_id)) == 2

        await until(continued)
        assert await engine.cancel(handle.run_id, reason="closed")
        with pytest.raises(RunCancelledError, match="closed"):
            await handle.result(timeout=WAIT)
    first, second = [await engine.get_run(i) for i in await _chain(engine, handle.run_id)]
    assert (first.status, second.status) == (RunStatus.COMPLETED, RunStatus.CANCELLED)
