"""Group commit: concurrent commits of one process carried out in one transaction.

A worker with K slots finishes stage bodies at nearly the same moment, and each finished
stage then needs a short transaction of a dozen statements (``job.execute`` phase 3). On
PostgreSQL the worker's client-side cost per statement, not the server, bounds
throughput. ``GroupCommit`` lets those commits share one transaction whose reads and
writes are set-oriented (``Transaction.runs.get_many``, ``update_stages``, ...): one statement
for the whole group where there were one per stage.

There is no timer and no background task. The first submitter becomes the *leader*: it
takes everything queued (its own item included) and commits it as one group; commits
submitted while it works queue up, and when it is done the leader hands the lead to the
oldest of them, which commits that next group. Under load groups grow by themselves (a
group's size is whatever finished during the previous commit); alone, a submitter
commits at once, so an idle worker pays no latency for the batching.

What a group commit means for each item is the caller's business (``commit_group``);
this module only orders the submissions. Every item gets its own result, or its own
exception, as if it had committed alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from treadle.kernel.errors import TransientStorageError

Item = TypeVar("Item")
Result = TypeVar("Result")

CommitGroup = Callable[[Sequence[Item]], Awaitable[Sequence["Result | BaseException"]]]

_LEAD = object()
"""Resolves a waiting submitter's future when the lead passes to it."""


@dataclass(eq=False)
class _Entry(Generic[Item]):
    item: Item
    future: asyncio.Future[object] = field(repr=False)


class GroupCommit(Generic[Item, Result]):
    """Orders submissions into groups; see the module docstring. One per kernel."""

    def __init__(self, limit: int = 64) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        """The most items one group commits (the rest wait for the next group)."""
        self._queue: list[_Entry[Item]] = []
        self._leading = False
        self._released: dict[asyncio.Task[object] | None, list[bool]] = {}
        """Per leading task: whether its group gave up the lead early (``release``)."""
        self.groups = 0
        """Groups committed so far (for tests and benchmarks)."""
        self.items = 0
        """Items committed so far, in all groups."""

    async def submit(
        self,
        item: Item,
        commit_group: CommitGroup[Item, Result],
        commit_one: Callable[[Item], Awaitable[Result]] | None = None,
        *,
        gather: bool = True,
    ) -> Result:
        """Commit ``item`` in the next group; returns its result or raises its error.
        ``commit_one`` (optional) commits a group of one: what ``commit_group([item])``
        would do, without the list of one in and the list of one out, for the caller
        that is alone (every stage of a sequential worker). ``gather=False``: a new
        leader takes its group at once, without waiting a turn (``_gather``), for a
        store whose commits never wait (in memory), where that turn would only reorder
        a deterministic harness's steps."""
        if not self._leading:
            self._leading = True
            if self._queue:  # only entries cancelled before their turn can be left
                self._queue[:] = [e for e in self._queue if not e.future.done()]
            try:
                if gather:
                    await self._gather()
            except asyncio.CancelledError:
                self._pass_lead()  # to whoever submitted meanwhile
                raise
            if not self._queue:
                if commit_one is None:
                    return await self._alone(item, commit_group, commit_one)
                # ``_alone`` with ``commit_one``, inlined (every stage of a worker that is
                # not busy passes here): alone to the end, so no entry, no future, no
                # leader registration (``release`` is for groups: a no-op inside it).
                try:
                    result = await commit_one(item)
                except Exception:
                    self.groups += 1
                    self.items += 1
                    raise
                finally:
                    self._pass_lead()
                self.groups += 1
                self.items += 1
                return result
            # Others submitted meanwhile: lead them, our item first.
            entry: _Entry[Item] = _Entry(item, asyncio.get_running_loop().create_future())
            self._queue.insert(0, entry)
        else:
            entry = _Entry(item, asyncio.get_running_loop().create_future())
            self._queue.append(entry)
            try:
                outcome = await entry.future
            except asyncio.CancelledError:
                self._withdraw(entry)
                raise
            if outcome is not _LEAD:
                return self._unwrap(outcome)
            # The lead passed to us; our entry is still first in the queue.
            self._leading = True
            try:
                if gather:
                    await self._gather()
            except asyncio.CancelledError:
                self._withdraw(entry)
                raise
        batch = self._queue[: self.limit]
        del self._queue[: len(batch)]
        try:
            outcomes = await self._lead(commit_group, [e.item for e in batch])
        except BaseException as exc:  # cancelled mid-commit: the others must not hang
            failure = TransientStorageError(f"group commit interrupted: {exc!r}")
            for other in batch:
                if other is not entry and not other.future.done():
                    other.future.set_exception(failure)
            raise
        self.groups += 1
        self.items += len(batch)
        own: object = None
        for other, outcome in zip(batch, outcomes, strict=True):
            if other is entry:
                own = outcome
            elif not other.future.done():  # a follower cancelled meanwhile gets nothing
                other.future.set_result(outcome)
        return self._unwrap(own)

    async def _gather(self) -> None:
        """One turn of the event loop before a new leader takes its group: the stages
        made ready in the same turn as the lead (the previous group's items resumed by
        its results, each running its chained next stage's body at once when that body
        does not wait) submit meanwhile and join this group instead of forming the next
        one. A stage alone waits for nothing but that turn; a busy worker's groups
        become one group per round of its slots instead of several smaller ones, each a
        statement of its own."""
        await asyncio.sleep(0)

    async def _alone(
        self,
        item: Item,
        commit_group: CommitGroup[Item, Result],
        commit_one: Callable[[Item], Awaitable[Result]] | None,
    ) -> Result:
        """Nobody leads and nobody waits: lead a group of one without queueing (no entry,
        no future: the common case of a worker that is not busy). Submissions arriving
        meanwhile queue as usual and get the lead afterwards."""
        self._leading = True
        if commit_one is None:
            (outcome,) = await self._lead(commit_group, [item])
        else:
            # Alone to the end (``release`` is for groups: a no-op inside ``commit_one``),
            # so no leader registration either.
            try:
                outcome = await commit_one(item)
            except Exception as exc:  # the item's own error, as a group returns it
                outcome = exc
            finally:
                self._pass_lead()
        self.groups += 1
        self.items += 1
        return self._unwrap(outcome)

    async def _lead(
        self, commit_group: CommitGroup[Item, Result], items: list[Item]
    ) -> Sequence[Result | BaseException]:
        """Run ``commit_group`` as the leader; the lead passes on when it returns or
        raises, or earlier if it calls ``release``."""
        task = asyncio.current_task()
        cell = self._released[task] = [False]
        try:
            return await commit_group(items)
        finally:
            del self._released[task]
            if not cell[0]:
                self._pass_lead()

    def release(self) -> None:
        """Give up the lead before the group has finished, called by ``commit_group``
        in the leader's task: the next group may start while this one finishes. A no-op
        outside a leader, and after the first call."""
        cell = self._released.get(asyncio.current_task())
        if cell is not None and not cell[0]:
            cell[0] = True
            self._pass_lead()

    def _pass_lead(self) -> None:
        """Hand the lead to the oldest waiting submitter, or give it up."""
        while self._queue:
            head = self._queue[0]
            if not head.future.done():
                head.future.set_result(_LEAD)
                return
            self._queue.pop(0)  # cancelled before its turn
        self._leading = False

    def _withdraw(self, entry: _Entry[Item]) -> None:
        """A waiting submitter was cancelled: its item is not committed. If the lead had
        just passed to it, pass it on."""
        had_lead = entry.future.done() and not entry.future.cancelled()
        if entry in self._queue:
            self._queue.remove(entry)
        if had_lead and entry.future.result() is _LEAD:
            self._pass_lead()

    @staticmethod
    def _unwrap(outcome: object) -> Result:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value]

    def __len__(self) -> int:
        """Submissions waiting for a group."""
        return len(self._queue)
