"""``@workflow``: a code workflow as a definition in the same registry as pipelines.

A code workflow compiles to the kernel's one model: a ``WorkflowDefinition`` with
``kind="code"`` and a single group holding one orchestrating stage
(``WORKFLOW_STAGE_ID``). ``job.execute`` on that stage runs the body under a
``WorkflowContext`` that replays the run's journal, so runs of code workflows are
created, claimed, cancelled, listed and inspected exactly like pipeline runs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import TypeAdapter

from treadle.kernel.definitions import (
    StageDefinition,
    WorkflowDefinition,
    declared_schedule,
    max_cost_of,
    retention_of,
)
from treadle.kernel.errors import DefinitionError, NotSupportedError
from treadle.kernel.flow_control import RateLimit, check_limits
from treadle.kernel.limits import to_duration
from treadle.kernel.queues import DEFAULT_QUEUE, check_queue
from treadle.kernel.retry import RetryPolicy

if TYPE_CHECKING:
    from treadle.kernel.workflows.context import WorkflowContext

WORKFLOW_STAGE_ID = "workflow"
"""The id of the one orchestrating stage of every code workflow run."""

ACTIVATION_RETRY = RetryPolicy(max_attempts=10, initial_delay=timedelta(seconds=1))
"""How often one activation of a body may be lost to a crash (a reaped lease or a
storage failure) before the run fails. Steps have their own retry policies."""

WorkflowFn = Callable[["WorkflowContext", Any], Awaitable[Any]]
F = TypeVar("F", bound=WorkflowFn)


async def _never_called(ctx: Any) -> Any:
    raise NotSupportedError("the orchestrating stage of a code workflow runs through its body")


@dataclass(frozen=True, eq=False)
class CodeWorkflowDefinition(WorkflowDefinition):
    """A ``WorkflowDefinition`` whose body is ``fn(ctx, input)``."""

    fn: WorkflowFn | None = field(default=None, repr=False)
    output_model: Any = None
    signals: Mapping[str, TypeAdapter[Any]] = field(default_factory=dict, repr=False)
    """Declared signal payload models: ``run.signal`` validates against them before
    anything is written."""
    updates: Mapping[str, TypeAdapter[Any]] = field(default_factory=dict, repr=False)
    """Declared update payload models, checked by ``run.update`` the same way."""
    step_overrides: Mapping[str, Callable[..., Any]] = field(default_factory=dict, repr=False)
    """Step name -> replacement function (``TestEngine.mock_step``)."""
    execution_timeout: timedelta | None = None
    """Cap on a run's wall-clock time from its start (``kernel.workflows.deadline``)."""

    @property
    def body(self) -> WorkflowFn:
        assert self.fn is not None
        return self.fn

    def with_step_overrides(
        self, overrides: Mapping[str, Callable[..., Any]]
    ) -> CodeWorkflowDefinition:
        return dataclasses.replace(self, step_overrides=overrides)


def workflow(
    *,
    id: str,
    input: Any,
    output: Any = None,
    version: str | int = "1",
    description: str | None = None,
    signals: Mapping[str, Any] | None = None,
    updates: Mapping[str, Any] | None = None,
    execution_timeout: timedelta | float | None = None,
    queue: str = DEFAULT_QUEUE,
    concurrency: int | None = None,
    concurrency_per_key: int | None = None,
    rate_limit: RateLimit | None = None,
    schedule: str | None = None,
    retention: timedelta | float | None = None,
    max_cost: Decimal | float | str | None = None,
) -> Callable[[WorkflowFn], CodeWorkflowDefinition]:
    """Decorate ``async def body(ctx: WorkflowContext, input) -> output`` as a code
    workflow. ``signals`` optionally maps signal names to payload models, so that
    ``engine.signal`` rejects a bad payload (naming the field) before it is stored;
    ``updates`` does the same for ``engine.update``. ``execution_timeout`` (a number
    means seconds) caps each run's wall-clock time from its start: past it the run is
    cancelled with the reason ``execution timeout``. ``queue``: only workers serving
    that queue run the workflow's body and steps (``treadle worker --queue``).
    ``concurrency``, ``concurrency_per_key`` and ``rate_limit`` cap the runs that start
    (see ``kernel/flow_control.py``). ``schedule`` (a cron expression, UTC) declares a
    schedule of the same id that starts a run with no input at each fire time
    (``define_schedule`` for a timezone, an input or other policies). ``retention``
    keeps the workflow's terminal runs that long before the maintenance tick purges them
    (docs/lifecycle.md). ``max_cost`` is each run's AI budget unless its start gives one
    (docs/ai.md)."""
    if not id or not isinstance(id, str):
        raise DefinitionError("workflow: id must be a non-empty string")
    try:
        check_queue(queue, f"workflow {id!r}")
        check_limits(f"workflow {id!r}", concurrency, concurrency_per_key, rate_limit)
    except ValueError as exc:
        raise DefinitionError(str(exc)) from None
    deadline = _positive_timedelta(id, "execution_timeout", execution_timeout)
    schedules = declared_schedule(id, schedule)
    keep = retention_of(id, retention)
    budget = max_cost_of(id, max_cost)

    def wrap(fn: WorkflowFn) -> CodeWorkflowDefinition:
        if not inspect.iscoroutinefunction(fn):
            raise DefinitionError(
                f"workflow {id!r}: the body must be an async function (async def), got {fn!r}"
            )
        stage = StageDefinition(
            id=WORKFLOW_STAGE_ID,
            fn=_never_called,
            input_model=input,
            output_model=output,
            name=id,
            retry=ACTIVATION_RETRY,
            input_adapter=TypeAdapter(input),
            output_adapter=TypeAdapter(Any if output is None else output),
        )
        return CodeWorkflowDefinition(
            id=id,
            version=str(version),
            input_model=input,
            groups=((stage,),),
            description=description or inspect.getdoc(fn),
            kind="code",
            input_adapter=TypeAdapter(input),
            stages={stage.id: stage},
            group_of={stage.id: 0},
            fn=fn,
            output_model=output,
            signals={name: TypeAdapter(model) for name, model in (signals or {}).items()},
            updates={name: TypeAdapter(model) for name, model in (updates or {}).items()},
            execution_timeout=deadline,
            queue=queue,
            concurrency=concurrency,
            concurrency_per_key=concurrency_per_key,
            rate_limit=rate_limit,
            schedules=schedules,
            retention=keep,
            max_cost=budget,
        )

    return wrap


def _positive_timedelta(workflow_id: str, what: str, value: Any) -> timedelta | None:
    if value is None:
        return None
    try:
        return to_duration(value, what)
    except ValueError as exc:
        raise DefinitionError(f"workflow {workflow_id!r}: {exc}") from None
