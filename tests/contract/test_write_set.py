"""``tx.write_set`` (ports/persistence/write_set.py): a hot-path commit's writes as one
unit, with exactly the effects and guards of the per-kind calls.

On PostgreSQL it is one statement (adapters/sql/persistence/write_set.py), so what these tests pin
matters there most: a guard that fails (the run's version moved, the job's lease moved,
a stage's version moved, a job id already taken) raises the per-kind call's error and
NOTHING of the set is written, not even the event counters (the next events are
numbered without a gap); events whose JSON goes to the blob store are refused
(``False``, nothing written) so the caller takes the per-kind path. On memory it is the
per-kind calls; on SQLite it declines (``False``) and the caller makes them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from treadle.kernel.errors import ConcurrencyError, DuplicateError, TreadleError
from treadle.kernel.events import StageCompleted, StageStarted, WorkflowCompleted
from treadle.kernel.model import (
    Job,
    JobStatus,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


async def _seed(backend: Any) -> tuple[Run, list[StageRun], Job]:
    """A RUNNING run whose stage ``a`` runs as job ``j1`` (leased to w1, attempt 1) and
    whose stage ``b`` waits, with two events already appended."""
    run = Run(id="r1", workflow_id="wf", status=RunStatus.RUNNING, created_at=T0, updated_at=T0)
    job = Job(
        id="j1",
        workflow_run_id="r1",
        workflow_id="wf",
        stage_id="a",
        status=JobStatus.LEASED,
        attempts=1,
        worker_id="w1",
        next_poll_at=T0,
        enqueued_at=T0,
    )
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(run)
        await tx.stages.insert_many(
            [
                StageRun(
                    workflow_run_id="r1",
                    stage_id="a",
                    execution_group=0,
                    status=StageStatus.RUNNING,
                    job_id="j1",
                ),
                StageRun(workflow_run_id="r1", stage_id="b", execution_group=1),
            ]
        )
        await backend.job_transport.enqueue(tx, [job])
        await tx.outbox.append(
            [StageStarted(workflow_run_id="r1", stage_id="a", attempt=1, timestamp=T0)] * 2
        )
    async with backend.persistence.transaction() as tx:
        stored = await tx.runs.get("r1")
        stages = (await tx.stages.for_runs(["r1"]))["r1"]
        leased = await backend.job_transport.get(tx, "j1")
    assert stored is not None
    assert leased is not None
    return stored, stages, leased


def _writes(run: Run, stages: list[StageRun], job: Job, *, output: Any = 1) -> dict[str, Any]:
    """Stage ``a``'s result: ``a`` completed, ``b`` started as job ``j2``, the run on to
    group 1, ``j1`` completed, three events."""
    a, b = stages
    j2 = evolve(job, {"id": "j2", "stage_id": "b", "attempts": 1})
    return {
        "runs": [evolve(run, {"current_group": 1, "updated_at": T0})],
        "new_jobs": [j2],
        "completed_jobs": ["j1"],
        "leases": {"j1": ("w1", 1)},
        "stages": [
            evolve(a, {"status": StageStatus.COMPLETED, "output": output, "completed_at": T0}),
            evolve(b, {"status": StageStatus.RUNNING, "job_id": "j2", "attempt": 1}),
        ],
        "events": [
            StageCompleted(
                workflow_run_id="r1", stage_id="a", attempt=1, output=output, timestamp=T0
            ),
            StageStarted(workflow_run_id="r1", stage_id="b", attempt=1, timestamp=T0),
            StageStarted(workflow_run_id="r1", stage_id="b", attempt=1, timestamp=T0),
        ],
    }


async def _write(backend: Any, tx: Any, writes: dict[str, Any], *, last: bool = False) -> bool:
    """``write_set``, or the per-kind calls where it declines (as ``WriteBuffer.flush``)."""
    if await tx.write_set(backend.job_transport, **writes, last=last):
        return True
    await tx.runs.update_many(writes["runs"])
    await backend.job_transport.enqueue(tx, writes["new_jobs"])
    await backend.job_transport.complete_many(tx, writes["completed_jobs"], leases=writes["leases"])
    await tx.stages.update_many(writes["stages"])
    await tx.outbox.append(writes["events"])
    return False


async def _state(backend: Any) -> tuple[Run, list[StageRun], dict[str, Job], list[int]]:
    async with backend.persistence.transaction() as tx:
        run = await tx.runs.get("r1")
        stages = (await tx.stages.for_runs(["r1"]))["r1"]
        jobs = await backend.job_transport.get_many(tx, ["j1", "j2"])
        events = await tx.outbox.events_for_run("r1")
    assert run is not None
    return run, stages, jobs, [e.sequence for e in events]


@pytest.mark.parametrize("last", [False, True], ids=["in-transaction", "last"])
async def test_write_set_writes_what_the_per_kind_calls_write(backend: Any, last: bool) -> None:
    run, stages, job = await _seed(backend)
    writes = _writes(run, stages, job)
    async with backend.persistence.transaction() as tx:
        one_unit = await _write(backend, tx, writes, last=last)
    assert one_unit is (backend.name != "sqlite")  # SQLite declines: the caller's calls
    got_run, got_stages, jobs, sequences = await _state(backend)
    assert (got_run.version, got_run.current_group) == (run.version + 1, 1)
    assert [(s.status, s.version) for s in got_stages] == [
        (StageStatus.COMPLETED, stages[0].version + 1),
        (StageStatus.RUNNING, stages[1].version + 1),
    ]
    assert got_stages[0].output == 1
    assert got_stages[1].job_id == "j2"
    assert (jobs["j1"].status, jobs["j1"].worker_id) == (JobStatus.COMPLETED, None)
    assert (jobs["j2"].status, jobs["j2"].worker_id) == (JobStatus.LEASED, "w1")
    assert sequences == [1, 2, 3, 4, 5]  # numbered on from the events already there


async def test_a_last_write_set_ends_its_transaction(backend: Any) -> None:
    """Sent as the whole transaction (PostgreSQL: committed as it runs), a further use of
    the transaction is refused rather than written outside it; the connection goes back
    to the pool transactional again."""
    if backend.name != "postgres":
        return  # memory and SQLite keep their transaction open to the end
    run, stages, job = await _seed(backend)
    writes = _writes(run, stages, job)

    async def write_then_read() -> None:
        async with backend.persistence.transaction() as tx:
            assert await tx.write_set(backend.job_transport, **writes, last=True)
            await tx.runs.get("r1")

    with pytest.raises(TreadleError, match="ended"):
        await write_then_read()
    got_run, _, _, sequences = await _state(backend)
    assert got_run.version == run.version + 1  # committed with its statement
    assert sequences == [1, 2, 3, 4, 5]

    async def update_then_fail() -> None:
        async with backend.persistence.transaction() as tx:
            await tx.runs.update(got_run)
            raise _BoomError

    for _ in range(3):  # whichever pooled connection it gets, the update rolls back
        with pytest.raises(_BoomError):
            await update_then_fail()
    assert (await _state(backend))[0].version == got_run.version


class _BoomError(Exception):
    pass


async def test_write_set_of_a_finished_run_tells_the_run_end_watchers(backend: Any) -> None:
    run, stages, job = await _seed(backend)
    writes = _writes(run, stages, job)
    writes["runs"] = [evolve(run, {"status": RunStatus.COMPLETED, "completed_at": T0})]
    writes["new_jobs"] = []
    writes["stages"] = writes["stages"][:1]
    writes["events"] = [WorkflowCompleted(workflow_run_id="r1", output=1, timestamp=T0)]
    told: list[Any] = []
    stop = backend.persistence.watch_run_ends(lambda ids, outcomes: told.append(list(ids)))
    try:
        async with backend.persistence.transaction() as tx:
            await _write(backend, tx, writes)
    finally:
        stop()
    assert told == [["r1"]]
    got_run, _, _, sequences = await _state(backend)
    assert got_run.status is RunStatus.COMPLETED
    assert sequences == [1, 2, 3]


@pytest.mark.parametrize("last", [False, True], ids=["in-transaction", "last"])
@pytest.mark.parametrize("moved", ["run", "lease", "stage", "job id"])
async def test_a_failed_guard_writes_nothing_of_the_set(
    backend: Any, moved: str, last: bool
) -> None:
    """``last``: the set is the whole transaction (on PostgreSQL its statement is sent
    without BEGIN/COMMIT, so only the statement's own atomicity undoes the rows)."""
    run, stages, job = await _seed(backend)
    writes = _writes(run, stages, job)
    async with backend.persistence.transaction() as tx:
        if moved == "run":  # e.g. an annotation merged into the run meanwhile
            await tx.runs.update(evolve(run, {"search_attributes": {"k": 1}}))
        elif moved == "lease":  # e.g. the lease reaped and the job leased again
            await backend.job_transport.requeue(tx, "j1", T0)
        elif moved == "stage":
            await tx.stages.update(evolve(stages[1], {"attempt": 7}))
        else:  # the next stage's job id is taken
            taken = evolve(writes["new_jobs"][0], {"status": JobStatus.QUEUED, "worker_id": None})
            await backend.job_transport.enqueue(tx, [taken])
    before = await _state(backend)
    error = DuplicateError if moved == "job id" else ConcurrencyError
    with pytest.raises(error) as raised:
        async with backend.persistence.transaction() as tx:
            await _write(backend, tx, writes, last=last)
    if backend.name == "postgres":  # refused by the one statement's guard check
        assert "nothing written" in str(raised.value)
    assert await _state(backend) == before  # nothing written
    # Nor were event numbers taken: the next append numbers on without a gap.
    async with backend.persistence.transaction() as tx:
        await tx.outbox.append(writes["events"][1:2])
    assert (await _state(backend))[3] == [1, 2, 3]


async def test_events_for_the_blob_store_take_the_per_kind_path(backend: Any) -> None:
    if backend.name == "memory":
        return  # nothing is offloaded in memory
    backend.persistence.offload_payloads(backend.blob_store, max_bytes=256)
    run, stages, job = await _seed(backend)
    big = {"text": "x" * 2000}
    writes = _writes(run, stages, job, output=big)
    async with backend.persistence.transaction() as tx:
        assert await tx.write_set(backend.job_transport, **writes) is False
        assert await tx.runs.get("r1") == run  # declined before writing anything
        await _write(backend, tx, writes)
    got_run, got_stages, jobs, sequences = await _state(backend)
    assert got_run.version == run.version + 1
    assert got_stages[0].output == big
    assert jobs["j1"].status is JobStatus.COMPLETED
    assert sequences == [1, 2, 3, 4, 5]
    async with backend.persistence.transaction() as tx:
        events = await tx.outbox.events_for_run("r1")
    assert events[2].output == big  # type: ignore[union-attr]


async def test_a_large_stage_output_with_small_events_is_still_one_unit(backend: Any) -> None:
    """A run or stage value for the blob store is stored first (in the same transaction)
    and the set refers to it; only events must be numbered before they are stored."""
    if backend.name == "memory":
        return
    backend.persistence.offload_payloads(backend.blob_store, max_bytes=256)
    run, stages, job = await _seed(backend)
    big = {"text": "y" * 2000}
    writes = _writes(run, stages, job)
    writes["stages"][0] = evolve(writes["stages"][0], {"output": big})
    async with backend.persistence.transaction() as tx:
        assert await _write(backend, tx, writes) is (backend.name == "postgres")
    _, got_stages, _, sequences = await _state(backend)
    assert got_stages[0].output == big
    assert sequences == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("feed", "reader"),
    [(True, True), (True, False), (False, True)],
    ids=["feed", "no-reader", "quiet"],
)
async def test_the_set_sends_the_event_feed_notify_only_to_a_live_reader(
    backend: Any, feed: bool, reader: bool
) -> None:
    """As ``outbox.append``: the event feed's NOTIFY with the events while a live reader
    is announced, none without one, and none when the persistence's ``notify_events``
    is off (PostgreSQL: a column of the one statement)."""
    if backend.name != "postgres":
        return
    import psycopg

    from treadle.adapters.event_feed import EVENTS_CHANNEL

    run, stages, job = await _seed(backend)
    backend.persistence.notify_events = feed
    if reader:
        await backend.persistence.announce_event_reader("test-reader", 60)
    dsn = backend.persistence.engine.url.set(drivername="postgresql").render_as_string(
        hide_password=False
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {EVENTS_CHANNEL}")
        async with backend.persistence.transaction() as tx:
            assert await tx.write_set(backend.job_transport, **_writes(run, stages, job), last=True)
        heard = [n.channel async for n in listener.notifies(timeout=0.5)]
    assert heard == ([EVENTS_CHANNEL] if feed and reader else [])


@pytest.mark.parametrize("stale", [False, True], ids=["prior", "stale-prior"])
async def test_with_the_prior_run_the_set_stores_the_run_as_written(
    backend: Any, stale: bool
) -> None:
    """``prior`` (the run as stored) lets PostgreSQL write only the run's columns that
    changed: what is stored is still exactly the run as written, whichever columns
    changed, large payloads included; a prior of another version is not trusted."""
    if backend.name != "memory":
        backend.persistence.offload_payloads(backend.blob_store, max_bytes=256)
    run, stages, job = await _seed(backend)
    async with backend.persistence.transaction() as tx:
        run = await tx.runs.update(evolve(run, {"input": {"big": "z" * 2000}, "config": {"c": 1}}))
    writes = _writes(run, stages, job)
    written = evolve(
        run,
        {
            "status": RunStatus.COMPLETED,
            "output": {"big": "o" * 2000},
            "search_attributes": {"k": True},
            "completed_at": T0,
            "current_group": 1,
        },
    )
    writes["runs"] = [written]
    prior = evolve(run, {"version": run.version - 1}) if stale else run
    async with backend.persistence.transaction() as tx:
        await tx.write_set(backend.job_transport, **writes, prior={"r1": prior}) or await _write(
            backend, tx, writes
        )
    got_run, got_stages, _, sequences = await _state(backend)
    assert got_run == evolve(written, {"version": run.version + 1, "stages": got_run.stages})
    assert got_run.input == {"big": "z" * 2000}
    assert got_run.search_attributes == {"k": True}
    assert got_stages[1].job_id == "j2"
    assert sequences == [1, 2, 3, 4, 5]


async def test_a_set_of_two_runs_writes_both(backend: Any) -> None:
    """More than one run's set (a group commit) takes the general statement on
    PostgreSQL: each run updated, each one's events numbered on its own."""
    run, stages, job = await _seed(backend)
    other = Run(id="r2", workflow_id="wf", status=RunStatus.RUNNING, created_at=T0, updated_at=T0)
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(other)
        stored = await tx.runs.get("r2")
    assert stored is not None
    writes = _writes(run, stages, job)
    writes["runs"].append(evolve(stored, {"current_group": 3, "updated_at": T0}))
    writes["events"].append(
        StageStarted(workflow_run_id="r2", stage_id="x", attempt=1, timestamp=T0)
    )
    async with backend.persistence.transaction() as tx:
        assert await _write(backend, tx, writes) is (backend.name != "sqlite")
    got_run, _, jobs, sequences = await _state(backend)
    assert (got_run.version, got_run.current_group) == (run.version + 1, 1)
    assert sequences == [1, 2, 3, 4, 5]
    assert jobs["j2"].status is JobStatus.LEASED
    async with backend.persistence.transaction() as tx:
        got_other = await tx.runs.get("r2")
        other_events = await tx.outbox.events_for_run("r2")
    assert got_other is not None
    assert (got_other.version, got_other.current_group) == (stored.version + 1, 3)
    assert [e.sequence for e in other_events] == [1]


@pytest.mark.parametrize("taken", ["run id", "idempotency key"])
async def test_an_insert_set_whose_run_is_taken_writes_nothing(backend: Any, taken: str) -> None:
    """``tx.insert_set`` (a start's inserts in one statement on PostgreSQL): a run whose
    id, or whose workflow's idempotency key, is taken raises ``DuplicateError`` as
    ``runs.insert`` does, and none of the set's job, stages or events is written."""
    insert_set = None
    async with backend.persistence.transaction() as tx:
        insert_set = getattr(tx, "insert_set", None)
    if insert_set is None or backend.name != "postgres":
        return  # the per-kind inserts: runs.insert's own tests
    keyed = Run(id="k1", workflow_id="wf", idempotency_key="key", created_at=T0, updated_at=T0)
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(keyed)
    new_id = "k1" if taken == "run id" else "k2"
    run = Run(
        id=new_id,
        workflow_id="wf",
        status=RunStatus.RUNNING,
        idempotency_key="key" if taken == "idempotency key" else "other",
        created_at=T0,
        updated_at=T0,
    )
    job = Job(
        id="j9",
        workflow_run_id=new_id,
        workflow_id="wf",
        stage_id="a",
        status=JobStatus.LEASED,
        attempts=1,
        worker_id="w1",
        next_poll_at=T0,
        enqueued_at=T0,
    )
    with pytest.raises(DuplicateError):
        async with backend.persistence.transaction() as tx:
            await tx.insert_set(
                backend.job_transport,
                runs=[run],
                new_jobs=[job],
                stages=[StageRun(workflow_run_id=new_id, stage_id="a", execution_group=0)],
                events=[
                    StageStarted(workflow_run_id=new_id, stage_id="a", attempt=1, timestamp=T0)
                ],
                last=True,
            )
    async with backend.persistence.transaction() as tx:
        assert await backend.job_transport.get(tx, "j9") is None
        assert (await tx.stages.for_runs([new_id])).get(new_id, []) == []
        assert await tx.outbox.events_for_run(new_id) == []
        stored = await tx.runs.get("k1")
    assert stored == keyed


async def test_an_insert_set_writes_what_the_per_kind_inserts_write(backend: Any) -> None:
    """A start's inserts as one unit: the run, its leased job, its stages in order (their
    ordinals from 0) and its events numbered from 1."""
    async with backend.persistence.transaction() as tx:
        insert_set = getattr(tx, "insert_set", None)
    if insert_set is None:
        return
    run = Run(id="n1", workflow_id="wf", status=RunStatus.RUNNING, created_at=T0, updated_at=T0)
    job = Job(
        id="jn",
        workflow_run_id="n1",
        workflow_id="wf",
        stage_id="a",
        status=JobStatus.LEASED,
        attempts=1,
        worker_id="w1",
        next_poll_at=T0,
        enqueued_at=T0,
    )
    stages = [
        StageRun(
            workflow_run_id="n1",
            stage_id="a",
            execution_group=0,
            status=StageStatus.RUNNING,
            job_id="jn",
            attempt=1,
        ),
        StageRun(workflow_run_id="n1", stage_id="b", execution_group=1),
    ]
    events = [StageStarted(workflow_run_id="n1", stage_id="a", attempt=1, timestamp=T0)] * 2
    async with backend.persistence.transaction() as tx:
        one_unit = await tx.insert_set(
            backend.job_transport, runs=[run], new_jobs=[job], stages=stages, events=events
        )
        assert one_unit is (backend.name == "postgres")
        if not one_unit:
            return
    async with backend.persistence.transaction() as tx:
        stored = await tx.runs.get("n1")
        got_stages = (await tx.stages.for_runs(["n1"]))["n1"]
        got_job = await backend.job_transport.get(tx, "jn")
        got_events = await tx.outbox.events_for_run("n1")
    assert stored == run
    assert [(s.stage_id, s.status, s.job_id) for s in got_stages] == [
        ("a", StageStatus.RUNNING, "jn"),
        ("b", StageStatus.PENDING, None),
    ]
    assert got_job is not None
    assert (got_job.status, got_job.worker_id) == (JobStatus.LEASED, "w1")
    assert [e.sequence for e in got_events] == [1, 2]
