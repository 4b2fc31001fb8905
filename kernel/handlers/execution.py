"""What the stage job path (``handlers/jobs.py``) and the code-workflow executor
(``workflows/executor.py``) share: the record of a started execution (``Started``), the
check that an execution still owns its stage (``is_current``) and output validation.

A floor below both, so that neither imports the other's private names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from treadle.kernel.definitions import StageDefinition, WorkflowDefinition
from treadle.kernel.errors import OutputValidationError
from treadle.kernel.limits import dump_json, precheck
from treadle.kernel.model import Job, JobStatus, JsonValue, Run, RunStatus, StageRun, StageStatus
from treadle.kernel.workflows.saga import is_compensating

# Bound once: reading a member through its Enum class goes through the metaclass on
# every stage (about 80 ns each in 3.11).
_STAGE_RUNNING = StageStatus.RUNNING
_JOB_LEASED = JobStatus.LEASED
_TERMINAL_RUN = frozenset(status for status in RunStatus if status.terminal)


@dataclass
class Started:
    """What phase 1 of ``job.execute`` read and wrote: the leased job, its run and stage,
    their definitions and the run's stages, as the body and the phase-3 commit see them."""

    job: Job
    run: Run
    stage: StageRun
    wf: WorkflowDefinition
    definition: StageDefinition
    stages: list[StageRun]
    fresh: bool = False
    """Started in the transaction that created the run: nothing of it was written
    before (a code workflow's journal is empty, with no read)."""
    index: int = -1
    """Where ``stage`` is in ``stages`` (-1: not noted): a hint for finding the stage in a
    later read of the run's stages, which come in the same (group) order."""


def validate_output(definition: StageDefinition, value: Any) -> JsonValue:
    """Check a stage's return value against its output model; returns its JSON form,
    storable on every backend (``kernel.limits``)."""
    adapter = definition.output_adapter
    what = definition.unstorable_output
    precheck(value, "output", OutputValidationError, what=what)
    try:
        model = adapter.validator.validate_python(value)  # as in ``jobs._build_context``
    except PydanticValidationError as exc:
        raise OutputValidationError.from_pydantic(
            f"stage {definition.id!r} returned output that does not match its model",
            exc,
            prefix="output",
        ) from None
    # The serializer itself: ``dump_python``'s keyword handling costs as much as the dump.
    return dump_json(adapter.serializer, model, "output", OutputValidationError, what=what)


def is_current(
    job: Job | None, stage: StageRun | None, run: Run | None, s: Started, worker_id: str
) -> bool:
    """Whether this execution still owns the stage (the duplicate-completion guard). A
    cancelled run is owned only by the activation running its compensations."""
    if job is None or stage is None or run is None:
        return False
    # The fields through one ``__dict__`` read per model: each field read of a model goes
    # through pydantic's ``__getattr__`` hook, and this runs in every stage's commit.
    held, ours = job.__dict__, stage.__dict__
    return (
        (run.status not in _TERMINAL_RUN or is_compensating(run, stage))
        and held["status"] is _JOB_LEASED
        and held["worker_id"] == worker_id
        and held["attempts"] == s.job.attempts
        and ours["status"] is _STAGE_RUNNING
        and ours["attempt"] == s.stage.attempt
    )
