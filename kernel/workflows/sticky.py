"""Sticky execution: a code workflow's body kept alive between its activations.

Replay makes every activation of a body cost its whole history: the journal is read
again and the body runs again from the top. Instead, a body that suspends in a call it
made itself (a signal wait, a sleep, a step's retry backoff, a child, a review) *parks*
there (``WorkflowContext._resumable``): its coroutine stays suspended in the middle of
that call, and the activation ends as it always did (the waits are journaled, the
stage is SUSPENDED). The parked body goes into this kernel's ``StickyCache`` (in
``Deps``, not a global), keyed by run, with the context that knows its journal.

The next activation of that run *on this kernel* takes the entry and checks that it
still describes the run (``reusable``): no other activation started since (the stage's
attempt, which every activation's first phase counts, is exactly one more), same
workflow definition and version, not a cancelled run's compensating activation. It then
reads only the journal from the parked position on (the waits just recorded and what
completed them) and resumes the body, which makes the same call again from the same
position and carries on. Entries before that position are final (no handler rewrites a
completed, failed or cancelled entry), so the parked body and a replay see the same
journal; a wake-up costs the same whatever the history.

Anything else replays from the top, as without the cache: a miss, a stale entry, a crash
(an activation that raises never puts its body back), another worker. Entries are
dropped (the coroutine closed, ``Body.close``) on a stale check, on cancel and on any run
end, when the LRU capacity (``KernelSettings.sticky_cache_size``) is exceeded, and by
``Kernel.close``. Closing throws ``GeneratorExit`` into the parked call after
``WorkflowContext.close``, so a ``finally`` of the body runs but cannot journal
anything or run a step.

A suspension that cannot park (a ``ctx.all`` / ``ctx.race`` still waiting, a body that
raised with compensations to retry) unwinds as before and the next activation replays.
"""

from __future__ import annotations

import contextvars
from collections import OrderedDict
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from treadle.kernel.errors import describe_exception
from treadle.kernel.model import RunStatus
from treadle.kernel.workflows.waits import PARKED

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.model import Run, StageRun
    from treadle.kernel.workflows.context import WorkflowContext

T = TypeVar("T")


class Body(Generic[T]):
    """Drives one body coroutine through as many activations as it needs.

    ``await body`` runs it within the activation awaiting it (its task, so a cancelled
    activation cancels the body) until the coroutine returns (``True``; then ``result``)
    or parks (``False``). Every resumption of the coroutine runs in one
    ``contextvars.Context`` of its own, as a task would, so context variables the body
    sets keep their values across a park."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._context = contextvars.copy_context()
        self.finished = False
        self.parked = False
        self._result: T | None = None

    @property
    def result(self) -> T:
        assert self.finished
        assert not self.parked
        return self._result  # type: ignore[return-value]  # set when the coroutine returned

    def __await__(self) -> Generator[Any, Any, bool]:
        assert not self.finished, "the body already ended"
        self.parked = False
        value: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                if thrown is None:
                    yielded = self._context.run(self._coro.send, value)
                else:
                    yielded = self._context.run(self._coro.throw, thrown)
            except StopIteration as stop:
                self.finished = True
                self._result = stop.value
                return True
            except BaseException:
                self.finished = True  # it raised out: the coroutine is done
                raise
            if yielded is PARKED:
                self.parked = True
                return False
            try:
                value, thrown = (yield yielded), None
            except GeneratorExit:  # the awaiting task itself is being destroyed
                self.close()
                raise
            except BaseException as exc:  # thrown into the awaiting task: a cancellation
                value, thrown = None, exc

    def close(self) -> BaseException | None:
        """Drop a parked (or never started) body: ``GeneratorExit`` at its park point.
        Returns what it raised instead of exiting cleanly, if anything."""
        if self.finished:
            return None
        self.finished = True
        self.parked = False
        try:
            self._context.run(self._coro.close)
        except BaseException as exc:  # never into the caller (a cancel, a run's end)
            return exc
        return None


@dataclass
class Parked:
    """A body parked between two activations of its run."""

    body: Body[Any]
    ctx: WorkflowContext
    wf: WorkflowDefinition
    attempt: int
    """The orchestrating stage's attempt in the activation that parked it."""

    def close(self) -> BaseException | None:
        self.ctx.close()
        return self.body.close()


def reusable(parked: Parked, run: Run, stage: StageRun, wf: WorkflowDefinition) -> str | None:
    """Why ``parked`` cannot serve the activation that started ``stage`` of ``run``
    under ``wf``; ``None`` when it can."""
    if stage.attempt != parked.attempt + 1:
        return "another activation ran since"  # here after a crash, or on another worker
    if wf is not parked.wf or run.workflow_version != parked.ctx.version:
        return "the workflow definition changed"
    if run.status is RunStatus.CANCELLED:
        return "the run was cancelled"  # its compensating activation replays
    if parked.ctx.parked_at is None:
        return "not parked"
    return None


class StickyCache:
    """This kernel's parked bodies by run id, least recently parked first (an LRU).
    Counts what happened to them, for tests and metrics."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, Parked] = OrderedDict()
        self.hits = 0
        """Activations that resumed a parked body."""
        self.misses = 0
        """Activations that found a parked body they could not use, and replayed."""
        self.evictions = 0
        """Parked bodies dropped unused: capacity, a cancel or end of their run, close."""
        self.close_errors: list[str] = []
        """The last ten exceptions closing a dropped body raised (rare: the executor
        turns what a body raises while it unwinds into a failure nobody records)."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._entries

    def take(self, run_id: str) -> Parked | None:
        """Remove and return the run's parked body, if this kernel holds one: whatever
        the activation does next, it either puts it back or drops it."""
        return self._entries.pop(run_id, None)

    def put(self, run_id: str, parked: Parked, capacity: int) -> None:
        """Keep ``parked``; the least recently parked bodies beyond ``capacity`` are
        dropped."""
        old = self._entries.pop(run_id, None)
        if old is not None and old is not parked:
            self.evictions += 1
            self.drop(old)
        self._entries[run_id] = parked
        while len(self._entries) > max(capacity, 0):
            _, oldest = self._entries.popitem(last=False)
            self.evictions += 1
            self.drop(oldest)

    def evict(self, run_id: str) -> bool:
        """Drop the run's parked body, if any (its run was cancelled or ended)."""
        parked = self._entries.pop(run_id, None)
        if parked is None:
            return False
        self.evictions += 1
        self.drop(parked)
        return True

    def clear(self) -> int:
        """Drop every parked body (the kernel is closing); returns how many."""
        count = len(self._entries)
        while self._entries:
            _, parked = self._entries.popitem(last=False)
            self.evictions += 1
            self.drop(parked)
        return count

    def drop(self, parked: Parked) -> None:
        """Close a body that will not be resumed (taken from the cache, or never put)."""
        error = parked.close()
        if error is not None:
            self.close_errors = [*self.close_errors[-9:], describe_exception(error)]
