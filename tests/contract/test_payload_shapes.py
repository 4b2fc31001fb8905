"""Persistence contract for user values shaped like the SQL adapter's stored encodings.

The SQL adapter stores a large JSON value in the BlobStore and keeps a reference,
``{"__treadle_blob__": key, "size": n}``, in the row; a user value of that very shape (or
of the escape that keeps the two apart, ``{"__treadle_value__": ...}``) must come back
unchanged from every JSON column, and must never be read as a reference. Every adapter
is held to it, the SQL ones with payload offload off and on (small values inline, the big
one in a blob), through the single-row and the set-oriented reads and writes alike.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from treadle.kernel.events import SignalReceived, UpdateReplied, WorkflowCompleted
from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
    Run,
    RunFilter,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)
from treadle.kernel.workflows.model import InboxMessage, JournalEntry, JournalStatus

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
FORGED = {"__treadle_blob__": "payloads/none/none", "size": 1}
"""The value of the issue, verbatim: a plain dict a user may pass as workflow input."""
SHAPES: list[Any] = [
    FORGED,
    {"__treadle_blob__": "payloads/none/none"},
    {"__treadle_blob__": 7, "size": "x", "extra": None},
    {"__treadle_value__": 1},
    {"__treadle_value__": FORGED},
    {"__treadle_value__": {"__treadle_value__": [FORGED]}},
    [FORGED],
    {"nested": FORGED},
    {"__treadle_blob__": "payloads/none/none", "size": 1, "pad": "p" * 3_000},
]
"""Last one: past the offload threshold below, so it is escaped *and* offloaded."""
THRESHOLD = 1_024


@pytest.fixture(params=["inline", "offload"])
def offloading(request: pytest.FixtureRequest, backend: Any) -> Any:
    """The backend, with SQL payload offload off (``inline``) or on (``offload``); the
    in-memory adapter keeps values as they are either way."""
    if request.param == "offload" and hasattr(backend.persistence, "offload_payloads"):
        backend.persistence.offload_payloads(backend.blob_store, max_bytes=THRESHOLD)
    return backend


def _run(i: int, shape: Any, **fields: Any) -> Run:
    return Run(
        id=f"r{i}",
        workflow_id="wf",
        input=shape,
        output=shape,
        idempotency_key=f"key-{i}",
        created_at=T0 + timedelta(seconds=i),
        updated_at=T0,
        **fields,
    )


def _stage(i: int, shape: Any) -> StageRun:
    return StageRun(
        workflow_run_id=f"r{i}",
        stage_id="s",
        execution_group=0,
        status=StageStatus.SUSPENDED,
        output=shape,
        suspended_state=shape,
        resume_state=shape,
        next_poll_at=T0,
    )


async def _seed(backend: Any, *, stages: bool = False) -> None:
    async with backend.persistence.transaction() as tx:
        for i, shape in enumerate(SHAPES):
            await tx.runs.insert(_run(i, shape))
        if stages:
            await tx.stages.insert_many([_stage(i, shape) for i, shape in enumerate(SHAPES)])


def _by_id(runs: Any) -> dict[str, Any]:
    return {run.id: run for run in runs}


async def test_run_input_and_output_shaped_like_references_round_trip(offloading: Any) -> None:
    """Run input and output shaped like an offload reference or its escape come back
    unchanged from every run read, and survive single and set-oriented rewrites."""
    backend = offloading
    await _seed(backend)
    ids = [f"r{i}" for i in range(len(SHAPES))]
    async with backend.persistence.transaction() as tx:
        single = [await tx.runs.get(run_id) for run_id in ids]
        keyed = [await tx.runs.find_by_key("wf", f"key-{i}") for i in range(len(SHAPES))]
        many = await tx.runs.get_many(ids)
        listed = _by_id(await tx.runs.query(RunFilter(limit=100)))
        inactive = _by_id(await tx.runs.inactive_since(RunStatus.PENDING, T0 + timedelta(1), 99))
        claimed = _by_id(await tx.runs.claim_pending(100))
    for i, shape in enumerate(SHAPES):
        for got in (single[i], keyed[i], many[f"r{i}"], listed[f"r{i}"]):
            assert got is not None
            assert (got.input, got.output) == (shape, shape), got.id
        for got in (inactive[f"r{i}"], claimed[f"r{i}"]):
            assert (got.input, got.output) == (shape, shape), got.id

    async with backend.persistence.transaction() as tx:  # written back as read
        runs = await tx.runs.get_many(ids, for_update=True)
        first, *rest = (runs[run_id] for run_id in ids)
        await tx.runs.update(evolve(first, {"status": RunStatus.RUNNING}))
        # Outputs rotated: each run's output now holds another shape.
        rotated = [
            evolve(run, {"output": SHAPES[(i + 2) % len(SHAPES)]})
            for i, run in enumerate(rest, start=1)
        ]
        await tx.runs.update_many(rotated)
    async with backend.persistence.transaction() as tx:
        again = await tx.runs.get_many(ids)
    assert again["r0"].status is RunStatus.RUNNING
    assert (again["r0"].input, again["r0"].output) == (SHAPES[0], SHAPES[0])
    for i in range(1, len(SHAPES)):
        assert again[f"r{i}"].input == SHAPES[i]
        assert again[f"r{i}"].output == SHAPES[(i + 2) % len(SHAPES)]


async def test_stage_payloads_shaped_like_references_round_trip(offloading: Any) -> None:
    """Stage output, suspended state and resume state shaped like a reference or its
    escape come back unchanged from every stage read and through both update forms."""
    backend = offloading
    await _seed(backend, stages=True)
    ids = [f"r{i}" for i in range(len(SHAPES))]
    async with backend.persistence.transaction() as tx:
        single = [await tx.stages.get(run_id, "s") for run_id in ids]
        per_run = [(await tx.stages.for_run(run_id))[0] for run_id in ids]
        many = await tx.stages.for_runs(ids)
        due = {s.workflow_run_id: s for s in await tx.stages.due_suspended(T0, 100)}
    for i, shape in enumerate(SHAPES):
        for got in (single[i], per_run[i], many[f"r{i}"][0], due[f"r{i}"]):
            assert got is not None
            assert (got.output, got.suspended_state, got.resume_state) == (shape, shape, shape)

    async with backend.persistence.transaction() as tx:
        stages = [s[0] for s in (await tx.stages.for_runs(ids)).values()]
        await tx.stages.update(evolve(stages[0], {"attempt": 1}))
        await tx.stages.update_many(
            [
                evolve(stage, {"output": SHAPES[(i + 3) % len(SHAPES)], "attempt": 2})
                for i, stage in enumerate(stages[1:], start=1)
            ]
        )
    async with backend.persistence.transaction() as tx:
        again = {run_id: s[0] for run_id, s in (await tx.stages.for_runs(ids)).items()}
    assert (again["r0"].attempt, again["r0"].output) == (1, SHAPES[0])
    for i in range(1, len(SHAPES)):
        stage = again[f"r{i}"]
        assert stage.output == SHAPES[(i + 3) % len(SHAPES)]
        assert (stage.suspended_state, stage.resume_state) == (SHAPES[i], SHAPES[i])


async def test_journal_and_inbox_values_shaped_like_references_round_trip(
    offloading: Any,
) -> None:
    """Step results and inputs, signal payloads and update replies shaped like a
    reference or its escape come back unchanged."""
    backend = offloading
    await _seed(backend)
    async with backend.persistence.transaction() as tx:
        for i, shape in enumerate(SHAPES):
            entry = JournalEntry(
                workflow_run_id=f"r{i}",
                position=0,
                name="step",
                occurrence=1,
                kind="step",
                status=JournalStatus.WAITING,
                input=shape if isinstance(shape, dict) else None,
                result=shape,
                created_at=T0,
            )
            await tx.journal.insert(entry)
            await tx.inbox.insert(
                InboxMessage(workflow_run_id=f"r{i}", name="sig", payload=shape, created_at=T0)
            )
            update = await tx.inbox.insert(
                InboxMessage(
                    workflow_run_id=f"r{i}",
                    kind="update",
                    name="upd",
                    update_id=f"u{i}",
                    payload=shape,
                    created_at=T0,
                )
            )
            assert update.id is not None
            await tx.inbox.set_reply(update.id, shape)
    for i, shape in enumerate(SHAPES):
        run_id = f"r{i}"
        async with backend.persistence.transaction() as tx:
            (entry,) = await tx.journal.entries(run_id)
            assert entry.result == shape
            assert entry.input == (shape if isinstance(shape, dict) else None)
            one = await tx.journal.get(run_id, "step", 1)
            assert one is not None
            await tx.journal.update(
                evolve(one, {"status": JournalStatus.COMPLETED, "result": SHAPES[-1 - i]})
            )
            latest = await tx.journal.latest(run_id, "step")
            signal = await tx.inbox.next_message(run_id, "sig")
            answered = await tx.inbox.find_update(run_id, f"u{i}")
            inbox = await tx.inbox.for_run(run_id)
        assert latest is not None
        assert latest.result == SHAPES[-1 - i]
        assert signal is not None
        assert signal.payload == shape
        assert answered is not None
        assert (answered.payload, answered.reply) == (shape, shape)
        assert [(m.payload, m.reply) for m in inbox] == [(shape, None), (shape, shape)]


async def test_idempotency_results_and_events_shaped_like_references_round_trip(
    offloading: Any,
) -> None:
    """Cached command results (single and set-oriented puts) and event fields shaped like a
    reference or its escape come back unchanged."""
    backend = offloading
    records = [
        IdempotencyRecord(
            key=f"k{i}",
            command_type="run.update",
            state=IdempotencyState.COMPLETED,
            result=shape,
            started_at=T0,
        )
        for i, shape in enumerate(SHAPES)
    ]
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put(records[0])
        await tx.idempotency.put_many(records[1:])
        await tx.outbox.append(
            [
                event
                for i, shape in enumerate(SHAPES)
                for event in (
                    SignalReceived(workflow_run_id=f"r{i}", timestamp=T0, name="s", payload=shape),
                    UpdateReplied(
                        workflow_run_id=f"r{i}", timestamp=T0, name="u", update_id="1", reply=shape
                    ),
                    WorkflowCompleted(workflow_run_id=f"r{i}", timestamp=T0, output=shape),
                )
            ]
        )
    async with backend.persistence.transaction() as tx:
        results = [(await tx.idempotency.get(f"k{i}", "run.update")) for i in range(len(SHAPES))]
        per_run = [await tx.outbox.events_for_run(f"r{i}") for i in range(len(SHAPES))]
        outbox = await tx.outbox.unpublished(1_000)
    assert results == records
    for i, shape in enumerate(SHAPES):
        signal, replied, completed = per_run[i]
        assert signal.payload == shape  # type: ignore[attr-defined]
        assert replied.reply == shape  # type: ignore[attr-defined]
        assert completed.output == shape  # type: ignore[attr-defined]
    assert [r.event for r in outbox] == [e for events in per_run for e in events]


async def test_a_forged_reference_to_another_runs_data_reads_back_verbatim(
    offloading: Any,
) -> None:
    """A value naming another run's offloaded payload key, or one of its artifact keys,
    is that value: it never reads the other run's data."""
    backend = offloading
    secret = {"secret": "s" * 4 * THRESHOLD}
    artifact = f"runs/victim/stages/s/artifacts/{'a' * 8}"
    await backend.blob_store.put(artifact, json.dumps(secret).encode())
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(
            Run(id="victim", workflow_id="wf", input=secret, created_at=T0, updated_at=T0)
        )
    keys = await backend.blob_store.list("payloads/")
    payload_key = keys[0] if keys else "payloads/victim/0"  # memory: nothing is offloaded
    forged = [
        {"__treadle_blob__": payload_key, "size": 1},
        {"__treadle_blob__": artifact, "size": 1},
    ]
    async with backend.persistence.transaction() as tx:
        for i, value in enumerate(forged):
            await tx.runs.insert(
                Run(id=f"thief{i}", workflow_id="wf", input=value, created_at=T0, updated_at=T0)
            )
            await tx.stages.insert_many(
                [StageRun(workflow_run_id=f"thief{i}", stage_id="s", execution_group=0)]
            )
            await tx.stages.update_many(
                [
                    evolve(s, {"output": value, "status": StageStatus.COMPLETED})
                    for s in await tx.stages.for_run(f"thief{i}")
                ]
            )
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get_many(["thief0", "thief1"])
        stages = await tx.stages.for_runs(["thief0", "thief1"])
        victim = await tx.runs.get("victim")
    assert [got[f"thief{i}"].input for i in range(2)] == forged
    assert [stages[f"thief{i}"][0].output for i in range(2)] == forged
    assert victim is not None
    assert victim.input == secret
