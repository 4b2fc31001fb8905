"""A start under tracing: the one place that hands the caller's trace context to a run.

``Engine.start``, ``Engine.start_or_signal`` and ``TestEngine.start`` dispatch
``run.create`` through ``start_traced`` when their kernel has a ``Telemetry``: it opens
the telemetry's start scope (a short ``treadle.start`` span in the caller's context),
stores its ``traceparent`` on the command and reports the run it started.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import treadle.kernel.commands as c

if TYPE_CHECKING:
    from treadle.ports import Telemetry

T = TypeVar("T")


async def start_traced(
    telemetry: Telemetry,
    command: c.RunCreate,
    start: Callable[[c.RunCreate], Awaitable[T]],
    describe: Callable[[T], tuple[str, bool]],
) -> T:
    """``await start(command)`` with the caller's trace context on ``command``;
    ``describe(result)`` gives the run id and whether it was created."""
    with telemetry.starting(command.workflow_id) as scope:
        if scope.trace_context is not None:
            command = command.model_copy(update={"trace_context": scope.trace_context})
        result = await start(command)
        run_id, created = describe(result)
        scope.started(run_id, command.workflow_id, created)
    return result
