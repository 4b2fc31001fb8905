"""When the next piece of timed work falls due, so a worker can sleep until then.

Three kinds of work become due at a time rather than on an event: a queued job's
retry backoff (``Job.next_poll_at``), a suspended stage's next check or a code
workflow's timer (``StageRun.next_poll_at``), and a command the Scheduler holds. A
worker that only looked at them on its maintenance tick (every 10 s by default)
would run a 2 s retry up to 10 s late. ``next_due_at`` asks the ports for the earliest
of them still in the future; the worker sleeps until then (and until its next tick,
whichever is first), and learns of due times its own executions create from their
results without asking storage again.
"""

from __future__ import annotations

import inspect
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treadle.kernel.kernel import Kernel


async def next_due_at(kernel: Kernel) -> datetime | None:
    """The earliest due time after now among queued jobs, suspended stages and scheduled
    commands; ``None`` if none is known. A time already past is left out: that work is
    due now, and the loops that take it (a free slot's dequeue, the tick) already run."""
    deps = kernel.deps
    now = deps.clock.now()
    found: list[datetime] = []
    for source in (
        getattr(deps.job_transport, "next_due_at", None),
        getattr(deps.persistence, "next_suspended_poll_at", None),
        getattr(deps.scheduler, "next_due_at", None),
    ):
        if source is None:
            continue
        value: Any = source()
        if inspect.isawaitable(value):
            value = await value
        if value is not None and value > now:
            found.append(value)
    return min(found, default=None)
