"""``Engine.start_many`` and ``run.createMany`` (issue 11) on memory, SQLite and PostgreSQL:
handles in order, idempotency keys across and within batches, a bad item rejecting its
batch with nothing written, one transaction (and a fixed number of statements) per batch,
and the wake-up of workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from treadle import Engine, RunStatus, WorkflowBuilder, define_stage
from treadle.adapters.sql import PgJobListener
from treadle.engine import StartItem
from treadle.kernel import commands as c
from treadle.kernel.errors import (
    DuplicateError,
    InvalidConfigError,
    InvalidInputError,
    TreadleValidationError,
    WorkflowNotFoundError,
)
from treadle.kernel.events import WorkflowCreated
from treadle.tests.scenario.helpers import WAIT, run_events, worker


class Num(BaseModel):
    n: int


class Step(BaseModel):
    step: int = 1


@define_stage(id="add", input=Num, output=Num, config=Step)
async def add(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n + ctx.config.step)


@define_stage(id="double", input=Num, output=Num)
async def double(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n * 2)


CALC = WorkflowBuilder("calc", input=Num).pipe(add).pipe(double).build()
ONE = WorkflowBuilder("one", input=Num).pipe(double).build()
WORKFLOWS = [CALC, ONE]


async def stored_runs(engine: Engine) -> list[Any]:
    return await engine.list(limit=10_000)


@contextmanager
def counted_transactions(engine: Engine) -> Iterator[list[int]]:
    """Counts the transactions the engine's kernel opens meanwhile (the persistence's
    ``transaction`` wrapped, on every backend)."""
    persistence: Any = engine.kernel.deps.persistence
    opened = [0]
    original = persistence.transaction

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened[0] += 1
        return original(*args, **kwargs)

    persistence.transaction = counting
    try:
        yield opened
    finally:
        del persistence.transaction


@asynccontextmanager
async def counted_statements(engine: Engine, containing: str = "") -> AsyncIterator[list[int]]:
    """Statements (containing ``containing``) the engine sends to its SQL database
    meanwhile; an executemany counts once."""
    assert engine.backend is not None
    sync_engine = engine.backend.persistence.engine.sync_engine  # type: ignore[attr-defined]
    sent = [0]

    def count(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if containing in statement:
            sent[0] += 1

    sa.event.listen(sync_engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        sa.event.remove(sync_engine, "before_cursor_execute", count)


async def test_handles_come_in_item_order_and_the_runs_complete(engine: Engine) -> None:
    """Each handle is the run of the item at its position; a worker completes them all."""
    items: list[Any] = [
        {"workflow_id": "calc", "input": {"n": i}, "config": {"add": {"step": i}}}
        for i in range(30)
    ]
    items[7] = StartItem(workflow_id="one", input={"n": 7}, priority=9)
    handles = await engine.start_many(items)
    assert len(handles) == 30
    assert len({h.run_id for h in handles}) == 30
    for i, handle in enumerate(handles):
        run = await handle.get()
        assert run.status is RunStatus.PENDING
        assert run.input == {"n": i}
        assert run.workflow_id == ("one" if i == 7 else "calc")
    assert (await handles[7].get()).priority == 9
    events = await run_events(engine, handles[0].run_id)
    assert [type(e) for e in events] == [WorkflowCreated]
    assert events[0].sequence == 1
    async with worker(engine, concurrency=4):
        outputs = [await h.result(timeout=WAIT) for h in handles]
    assert outputs == [{"n": 14} if i == 7 else {"n": (i + i) * 2} for i in range(30)]


async def test_one_transaction_and_a_fixed_number_of_statements_per_batch(
    engine: Engine, url: str
) -> None:
    """``start_many`` commits each batch of ``batch_size`` items in one transaction; on SQL
    a batch of 200 runs sends (almost) as many statements as a batch of 2."""
    items = [{"workflow_id": "calc", "input": {"n": i}} for i in range(250)]
    persistence: Any = engine.kernel.deps.persistence
    commits_before = getattr(persistence, "commits", 0)
    with counted_transactions(engine) as opened:
        handles = await engine.start_many(items, batch_size=100)
    assert len(handles) == 250
    assert opened[0] == 3
    if url == "memory://":
        assert persistence.commits - commits_before == 3
        return
    with counted_transactions(engine) as opened:
        async with counted_statements(engine) as small:
            await engine.start_many(items[:2])
        async with counted_statements(engine) as large:
            await engine.start_many([{"workflow_id": "one", "input": {"n": i}} for i in range(200)])
    assert opened[0] == 2
    # SQLite: runs, stages, event sequences, outbox (its BEGIN IMMEDIATE is sent by its
    # driver's dialect, not through a cursor). PostgreSQL inserts them all in one
    # statement (``tx.insert_set``, with the NOTIFY), from 64 stages on with two more
    # around it (``plan_cache_mode``, see ``insert_stages``).
    if url.startswith("sqlite"):
        assert small[0] == large[0] == 4
    else:
        assert small[0] + 2 == large[0] == 3


async def test_idempotency_keys_are_honoured_across_and_within_batches(engine: Engine) -> None:
    """A key that names a run started before (by ``start`` or ``start_many``), or an earlier
    item of the call, gives that run and creates nothing; keys are per workflow."""
    single = await engine.start("calc", {"n": 100}, idempotency_key="k-start")
    first = await engine.start_many(
        [
            {"workflow_id": "calc", "input": {"n": 0}, "idempotency_key": "k0"},
            {"workflow_id": "calc", "input": {"n": 1}, "idempotency_key": "k1"},
            {"workflow_id": "calc", "input": {"n": 2}, "idempotency_key": "k0"},  # = item 0
            {"workflow_id": "one", "input": {"n": 3}, "idempotency_key": "k0"},  # other wf
            {"workflow_id": "calc", "input": {"n": 4}},
        ],
        batch_size=2,  # items 0 and 2 land in different batches
    )
    assert first[2].run_id == first[0].run_id
    assert len({h.run_id for h in first}) == 4
    again = await engine.start_many(
        [
            {"workflow_id": "calc", "input": {"n": 9}, "idempotency_key": "k1"},
            {"workflow_id": "calc", "input": {"n": 9}, "idempotency_key": "k-start"},
            {"workflow_id": "calc", "input": {"n": 9}, "idempotency_key": "k-new"},
            {"workflow_id": "one", "input": {"n": 9}, "idempotency_key": "k0"},
            {"workflow_id": "calc", "input": {"n": 9}, "idempotency_key": "k-new"},
        ]
    )
    assert [h.run_id for h in again] == [
        first[1].run_id,
        single.run_id,
        again[2].run_id,
        first[3].run_id,
        again[2].run_id,
    ]
    assert (await again[0].get()).input == {"n": 1}  # the first start's input is kept
    assert len(await stored_runs(engine)) == 6
    # ``engine.start`` finds a run that ``start_many`` created by its key.
    assert (await engine.start("calc", {"n": 5}, idempotency_key="k-new")).run_id == again[2].run_id
    # The kernel's results say which items created their run.
    result = await engine.kernel.dispatch(
        c.RunCreateMany(
            items=[
                c.RunCreateItem(workflow_id="calc", input={"n": 1}, idempotency_key="k1"),
                c.RunCreateItem(workflow_id="calc", input={"n": 1}, idempotency_key="k-x"),
                c.RunCreateItem(workflow_id="calc", input={"n": 1}, idempotency_key="k-x"),
            ]
        )
    )
    assert [r.created for r in result.runs] == [False, True, False]
    assert result.runs[1].workflow_run_id == result.runs[2].workflow_run_id
    assert {r.status for r in result.runs} == {RunStatus.PENDING}


async def test_a_batch_key_replays_the_whole_result(engine: Engine) -> None:
    """The command's own idempotency key caches its result, as for every command."""
    command = c.RunCreateMany(
        items=[c.RunCreateItem(workflow_id="calc", input={"n": i}) for i in range(3)],
        idempotency_key="batch-1",
    )
    first = await engine.kernel.dispatch(command)
    again = await engine.kernel.dispatch(command)
    assert again == first
    assert len(await stored_runs(engine)) == 3


@pytest.mark.parametrize(
    ("bad", "error", "field"),
    [
        ({"workflow_id": "calc", "input": {"n": "x"}}, InvalidInputError, "items[{i}].input.n"),
        ({"workflow_id": "calc", "input": {}}, InvalidInputError, "items[{i}].input.n"),
        (
            {"workflow_id": "calc", "input": {"n": 1}, "config": {"add": {"step": "x"}}},
            InvalidConfigError,
            "items[{i}].config.add.step",
        ),
        (
            {"workflow_id": "calc", "input": {"n": 1}, "config": {"nope": {}}},
            InvalidConfigError,
            "items[{i}].config.nope",
        ),
        (
            {"workflow_id": "calc", "input": {"n": 1}, "search_attributes": {"a": [1]}},
            TreadleValidationError,
            "items[{i}].search_attributes.a",
        ),
        (
            {"workflow_id": "nope", "input": {"n": 1}},
            WorkflowNotFoundError,
            "items[{i}].workflow_id",
        ),
        (
            {"workflow_id": "calc", "input": {"n": 1}, "priority": 500},
            TreadleValidationError,
            "items[{i}].priority",
        ),
        (
            {"workflow_id": "calc", "input": {"n": 1}, "colour": "red"},
            TreadleValidationError,
            "items[{i}].colour",
        ),
        ({"input": {"n": 1}}, TreadleValidationError, "items[{i}].workflow_id"),
    ],
)
@pytest.mark.parametrize("index", [3, 250])
async def test_a_bad_item_rejects_the_call_naming_it_and_writes_nothing(
    engine: Engine, bad: dict[str, Any], error: type[Exception], field: str, index: int
) -> None:
    """Whichever batch it falls in, a bad item raises an error naming its index and field,
    and not one run is written (the earlier batches included)."""
    items: list[Any] = [{"workflow_id": "calc", "input": {"n": i}} for i in range(300)]
    items[index] = bad
    with pytest.raises(error, match=field.format(i=index).replace("[", r"\[")):
        await engine.start_many(items, batch_size=100)
    assert await stored_runs(engine) == []


async def test_a_bad_item_of_a_command_rejects_the_batch(engine: Engine) -> None:
    """``run.createMany`` sent to the kernel: the error names the item, nothing is written."""
    items = [c.RunCreateItem(workflow_id="calc", input={"n": i}) for i in range(5)]
    items[3] = c.RunCreateItem(workflow_id="calc", input={"name": "x"})
    with pytest.raises(InvalidInputError, match=r"items\[3\]\.input\.n: Field required") as raised:
        await engine.kernel.dispatch(c.RunCreateMany(items=items))
    assert raised.value.errors == [("items[3].input.n", "Field required")]
    assert await stored_runs(engine) == []


async def test_one_run_id_for_two_new_runs_is_refused(engine: Engine) -> None:
    """Two items creating runs under one ``run_id`` are refused with nothing written; the
    same ``run_id`` on items sharing a key is the one run."""
    with pytest.raises(TreadleValidationError, match=r"items\[2\]\.run_id"):
        await engine.start_many(
            [
                {"workflow_id": "calc", "input": {"n": 0}, "run_id": "same"},
                {"workflow_id": "calc", "input": {"n": 1}},
                {"workflow_id": "one", "input": {"n": 2}, "run_id": "same"},
            ]
        )
    assert await stored_runs(engine) == []
    handles = await engine.start_many(
        [
            {"workflow_id": "calc", "input": {"n": 0}, "run_id": "same", "idempotency_key": "k"},
            {"workflow_id": "calc", "input": {"n": 0}, "run_id": "same", "idempotency_key": "k"},
        ]
    )
    assert [h.run_id for h in handles] == ["same", "same"]
    with pytest.raises(DuplicateError, match="'same'"):
        await engine.start_many([{"workflow_id": "one", "input": {"n": 0}, "run_id": "same"}])
    assert len(await stored_runs(engine)) == 1


async def test_an_empty_call_starts_nothing(engine: Engine) -> None:
    """No items, no handles and no transaction."""
    with counted_transactions(engine) as opened:
        assert await engine.start_many([]) == []
    assert opened[0] == 0


async def test_arguments_are_checked(engine: Engine) -> None:
    """``items`` must be a list of mappings or ``StartItem``s, ``batch_size`` 1..10,000."""
    with pytest.raises(TreadleValidationError, match="items"):
        await engine.start_many({"workflow_id": "calc"})  # type: ignore[arg-type]
    with pytest.raises(TreadleValidationError, match=r"items\[1\]"):
        await engine.start_many([{"workflow_id": "calc", "input": {"n": 1}}, 42])  # type: ignore[list-item]
    with pytest.raises(TreadleValidationError, match="batch_size"):
        await engine.start_many([], batch_size=0)
    assert await stored_runs(engine) == []


async def test_started_runs_wake_an_idle_worker(engine: Engine) -> None:
    """An in-process worker polling every minute runs the batch at once: ``start_many``
    wakes it (and, on PostgreSQL, the commit's ``NOTIFY``)."""
    async with engine.worker(concurrency=4, orchestration_interval=60, job_poll_interval=60):
        handles = await engine.start_many(
            [{"workflow_id": "one", "input": {"n": i}} for i in range(20)]
        )
        outputs = [await h.result(timeout=WAIT) for h in handles]
    assert outputs == [{"n": 2 * i} for i in range(20)]


@pytest.mark.postgres
async def test_each_batch_notifies_once_and_wakes_another_engines_worker(
    treadle_postgres_url: str,
) -> None:
    """On PostgreSQL each batch's commit sends one ``NOTIFY treadle_jobs, 'run'``: a worker
    of another engine (its own pool and listener, as another process), polling every
    minute, runs the batches at once."""
    async with (
        await Engine.open(treadle_postgres_url, workflows=WORKFLOWS) as producer,
        await Engine.open(treadle_postgres_url, workflows=WORKFLOWS) as consumer,
    ):
        assert consumer.backend is not None
        listener = consumer.backend.wake_source
        assert isinstance(listener, PgJobListener)
        async with consumer.worker(concurrency=4, orchestration_interval=60, job_poll_interval=60):
            await listener.wait_listening()
            heard = listener.notifications
            async with counted_statements(producer, "treadle_jobs") as notifies:
                handles = await producer.start_many(
                    [{"workflow_id": "one", "input": {"n": i}} for i in range(10)], batch_size=5
                )
            outputs = [await h.result(timeout=WAIT) for h in handles]
        assert notifies[0] == 2
        assert listener.notifications - heard >= 1
    assert outputs == [{"n": 2 * i} for i in range(10)]


async def test_large_inputs_are_offloaded(url: str) -> None:
    """Inputs past ``payload_max_bytes`` go to the blob store through ``start_many`` as
    through ``start``, and read back whole."""
    if url == "memory://":
        pytest.skip("the in-memory adapter keeps every payload inline")
    big = {"n": 1, "pad": "x" * 5_000}

    class Padded(BaseModel):
        n: int
        pad: str

    @define_stage(id="length", input=Padded, output=Num)
    async def length(ctx):  # type: ignore[no-untyped-def]
        return Num(n=len(ctx.input.pad))

    padded = WorkflowBuilder("padded", input=Padded).pipe(length).build()
    async with await Engine.open(url, workflows=[padded], payload_max_bytes=1_000) as opened:
        handles = await opened.start_many(
            [
                {"workflow_id": "padded", "input": big},
                {"workflow_id": "padded", "input": {"n": 2, "pad": ""}},
            ]
        )
        assert opened.backend is not None
        blobs = await opened.backend.blob_store.list("payloads/")
        assert [key.split("/")[1] for key in blobs] == [handles[0].run_id]
        assert (await handles[0].get()).input == big
        async with worker(opened):
            assert await handles[0].result(timeout=WAIT) == {"n": 5_000}
            assert await handles[1].result(timeout=WAIT) == {"n": 0}


async def test_concurrent_calls_with_shared_keys_make_one_run_per_key(engine: Engine) -> None:
    """Two calls racing with overlapping keys in opposite orders (on PostgreSQL both look
    their keys up before either commits, and insert at the same time) end with one run
    per key, both calls' handles naming it, and no deadlock."""

    def items(keys: range) -> list[dict[str, Any]]:
        return [{"workflow_id": "one", "input": {"n": k}, "idempotency_key": f"k{k}"} for k in keys]

    for round_ in range(3):
        base = round_ * 10_000
        left, right = await asyncio.gather(
            engine.start_many(items(range(base, base + 1_500)), batch_size=1_500),
            engine.start_many(items(range(base + 1_999, base + 499, -1)), batch_size=1_500),
        )
        # Keys 500..1499 of the round are in both calls.
        assert [h.run_id for h in left[500:]] == [h.run_id for h in right[1_499:499:-1]]
    runs = await stored_runs(engine)
    assert len(runs) == 3 * 2_000
    assert len({r.idempotency_key for r in runs}) == 3 * 2_000
