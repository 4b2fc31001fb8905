"""``tx.append_journal`` (ports/persistence/journal.py): a code-workflow step's commit
without reads, and ``tx.write_set``'s journal part (a completing activation's last calls).

``append_journal`` writes new journal entries and their events only while the run, its
orchestrating stage and the job are as the ``JournalOwner`` says. What these tests pin:
the entries come back with their ids and the events numbered on; a run, stage or lease
that moved raises ``ConcurrencyError``, an entry already recorded ``DuplicateError``,
and then NOTHING is written (not even the event counters); values for the blob store
are declined (``None``, nothing written). PostgreSQL offers it (one statement without
BEGIN/COMMIT); SQLite declines (``None``); memory lacks it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.events import StageStarted, StepCompleted
from treadle.kernel.model import Job, JobStatus, Run, RunStatus, StageRun, StageStatus, evolve
from treadle.kernel.workflows.model import JournalEntry, JournalOwner, JournalStatus

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
STAGE = "workflow"  # WORKFLOW_STAGE_ID


async def _seed(backend: Any) -> tuple[Run, StageRun, Job]:
    """A RUNNING code-workflow run whose stage runs as job ``j1`` (leased to w1, attempt
    1), with one journal entry and one event already recorded."""
    run = Run(id="r1", workflow_id="wf", status=RunStatus.RUNNING, created_at=T0, updated_at=T0)
    job = Job(
        id="j1",
        workflow_run_id="r1",
        workflow_id="wf",
        stage_id=STAGE,
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
                    stage_id=STAGE,
                    execution_group=0,
                    status=StageStatus.RUNNING,
                    attempt=1,
                    job_id="j1",
                )
            ]
        )
        await backend.job_transport.enqueue(tx, [job])
        await tx.journal.insert(_entry(0, "first"))
        await tx.outbox.append(
            [StageStarted(workflow_run_id="r1", stage_id=STAGE, attempt=1, timestamp=T0)]
        )
    async with backend.persistence.transaction() as tx:
        stored = await tx.runs.get("r1")
        stage = await tx.stages.get("r1", STAGE)
    assert stored is not None
    assert stage is not None
    return stored, stage, job


def _entry(position: int, name: str, result: Any = 1) -> JournalEntry:
    return JournalEntry(
        workflow_run_id="r1",
        position=position,
        name=name,
        occurrence=1,
        kind="step",
        status=JournalStatus.COMPLETED,
        attempts=1,
        result=result,
        idempotency_key=f"r1:{name}:1",
        created_at=T0,
        completed_at=T0,
    )


def _event(name: str, result: Any = 1) -> StepCompleted:
    return StepCompleted(
        workflow_run_id="r1", timestamp=T0, step=name, occurrence=1, attempt=1, output=result
    )


def _owner(run: Run, stage: StageRun) -> JournalOwner:
    return JournalOwner(
        run_id="r1",
        run_version=run.version,
        stage_id=STAGE,
        stage_version=stage.version,
        job_id="j1",
        worker_id="w1",
        job_attempts=1,
    )


async def _state(backend: Any) -> tuple[list[tuple[int, str, Any]], list[int]]:
    async with backend.persistence.transaction() as tx:
        journal = await tx.journal.entries("r1")
        events = await tx.outbox.events_for_run("r1")
    return [(e.position, e.name, e.result) for e in journal], [e.sequence for e in events]


async def test_append_journal_writes_the_entries_and_events(backend: Any) -> None:
    run, stage, _ = await _seed(backend)
    entries = [_entry(1, "second", {"n": 2}), _entry(2, "third", [3])]
    async with backend.persistence.transaction() as tx:
        append = getattr(tx, "append_journal", None)
        stored = None
        if append is not None:
            stored = await append(
                backend.job_transport,
                _owner(run, stage),
                entries,
                [_event("second"), _event("third")],
            )
    if backend.name != "postgres":
        assert stored is None  # declined (SQLite) or not offered (memory): nothing sent
        return
    assert stored is not None
    assert [(e.position, e.version) for e in stored] == [(1, 0), (2, 0)]
    assert all(e.id is not None for e in stored)
    journal, sequences = await _state(backend)
    assert journal == [(0, "first", 1), (1, "second", {"n": 2}), (2, "third", [3])]
    async with backend.persistence.transaction() as tx:
        ids = {e.position: e.id for e in await tx.journal.entries("r1")}
    assert [ids[e.position] for e in stored] == [e.id for e in stored]
    assert sequences == [1, 2, 3]


@pytest.mark.parametrize("moved", ["run", "stage", "lease", "entry"])
async def test_a_failed_guard_writes_nothing(backend: Any, moved: str) -> None:
    if backend.name != "postgres":
        return  # only PostgreSQL offers it
    run, stage, _ = await _seed(backend)
    entries = [_entry(1, "second")]
    async with backend.persistence.transaction() as tx:
        if moved == "run":  # a cancel, a pause, an annotation
            await tx.runs.update(evolve(run, {"search_attributes": {"k": 1}}))
        elif moved == "stage":  # another activation started
            await tx.stages.update(evolve(stage, {"attempt": 2}))
        elif moved == "lease":  # reaped and queued again
            await backend.job_transport.requeue(tx, "j1", T0)
        else:  # already recorded (at that position)
            await tx.journal.insert(_entry(1, "other"))
    before = await _state(backend)
    with pytest.raises(DuplicateError if moved == "entry" else ConcurrencyError):
        async with backend.persistence.transaction() as tx:
            await tx.append_journal(
                backend.job_transport, _owner(run, stage), entries, [_event("second")]
            )
    assert await _state(backend) == before
    async with backend.persistence.transaction() as tx:  # no event number was taken
        await tx.outbox.append([_event("later")])
    assert (await _state(backend))[1] == [*before[1], len(before[1]) + 1]


async def test_values_for_the_blob_store_are_declined(backend: Any) -> None:
    if backend.name != "postgres":
        return
    run, stage, _ = await _seed(backend)
    backend.persistence.offload_payloads(backend.blob_store, max_bytes=64)
    before = await _state(backend)
    async with backend.persistence.transaction() as tx:
        stored = await tx.append_journal(
            backend.job_transport, _owner(run, stage), [_entry(1, "big", "x" * 500)], []
        )
    assert stored is None
    assert await _state(backend) == before


async def test_write_set_inserts_journal_entries_under_its_guards(backend: Any) -> None:
    """The completion's write set: run, stage, job and the last entries in one unit; an
    entry already recorded writes none of it (``DuplicateError``)."""
    run, stage, _ = await _seed(backend)
    done = evolve(stage, {"status": StageStatus.COMPLETED, "output": 1, "completed_at": T0})
    writes: dict[str, Any] = {
        "runs": [evolve(run, {"status": RunStatus.COMPLETED, "output": 1, "completed_at": T0})],
        "new_jobs": [],
        "completed_jobs": ["j1"],
        "leases": {"j1": ("w1", 1)},
        "stages": [done],
        "events": [_event("second")],
    }
    async with backend.persistence.transaction() as tx:
        await tx.journal.insert(_entry(1, "taken"))

    async def taken_position() -> None:
        async with backend.persistence.transaction() as tx:
            if not await tx.write_set(
                backend.job_transport, **writes, journal=[_entry(1, "second")], last=True
            ):
                raise DuplicateError("declined: the per-kind insert would raise")

    with pytest.raises(DuplicateError):
        await taken_position()
    async with backend.persistence.transaction() as tx:
        assert (await tx.runs.get("r1")).status is RunStatus.RUNNING  # type: ignore[union-attr]
    async with backend.persistence.transaction() as tx:
        one_unit = await tx.write_set(
            backend.job_transport, **writes, journal=[_entry(2, "second")], last=True
        )
        if not one_unit:  # SQLite: the per-kind calls, as WriteBuffer.flush makes them
            await tx.runs.update_many(writes["runs"])
            await backend.job_transport.complete_many(tx, ["j1"], leases=writes["leases"])
            await tx.stages.update_many(writes["stages"])
            await tx.journal.insert(_entry(2, "second"))
            await tx.outbox.append(writes["events"])
    assert one_unit is (backend.name != "sqlite")
    journal, sequences = await _state(backend)
    assert journal == [(0, "first", 1), (1, "taken", 1), (2, "second", 1)]
    assert sequences == [1, 2]
    async with backend.persistence.transaction() as tx:
        assert (await tx.runs.get("r1")).status is RunStatus.COMPLETED  # type: ignore[union-attr]
