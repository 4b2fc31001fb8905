"""``outbox.flush`` and ``plugin.replayDLQ``: publish committed events in per-run order.

Events are read in one transaction, published outside it (a slow sink never
holds a lock), and their fate recorded in a second. A run whose event fails stops
publishing for this flush (fail-fast), so its consumers never see a later event
before an earlier one. A failed event is retried after ``outbox_retry_delay``,
doubling per failure up to ``outbox_retry_max_delay`` (``OutboxRecord.retry_at``;
until then flushes skip its run); after ``outbox_max_attempts`` failures the event
goes to the dead-letter queue and the run's later events flow again.
``plugin.replayDLQ`` puts dead letters back in the outbox, for the next flush to publish.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, cast

import treadle.kernel.commands as c
from treadle.kernel.errors import describe_exception
from treadle.kernel.events import EventBase, OutboxRecord

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps, Scope


async def _publish(deps: Deps, event: EventBase) -> None:
    await deps.event_sink.publish(event)
    for plugin in deps.plugins:
        await plugin.on_event(event)


Failure = tuple[OutboxRecord, str, bool]
"""A failed publication: the record, the error, whether it goes to the DLQ now."""


def retry_delay(deps: Deps, attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th failed publication of an event."""
    settings = deps.settings
    factor: int = 2 ** min(max(attempts - 1, 0), 32)
    delay: timedelta = min(settings.outbox_retry_delay * factor, settings.outbox_retry_max_delay)
    return delay


def _waiting(record: OutboxRecord, now: datetime) -> bool:
    return record.retry_at is not None and record.retry_at > now


def _failed(deps: Deps, record: OutboxRecord, exc: Exception, failures: list[Failure]) -> None:
    dead = record.attempts + 1 >= deps.settings.outbox_max_attempts
    failures.append((record, describe_exception(exc), dead))
    deps.logger.warning(
        "outbox.publish_failed",
        run_id=record.event.workflow_run_id,
        sequence=record.event.sequence,
        attempts=record.attempts + 1,
        dead_lettered=dead,
        error=describe_exception(exc),
    )


async def _publish_each(
    deps: Deps,
    batch: list[OutboxRecord],
    published: list[int],
    failures: list[Failure],
    now: datetime,
) -> None:
    blocked: set[str] = set()
    sink, plugins = deps.event_sink, deps.plugins
    for record in batch:
        # The record's fields through one read of its ``__dict__`` (each attribute read
        # of a model goes through pydantic's ``__getattr__`` hook): every event of every
        # stage passes here.
        fields = record.__dict__
        event, retry_at = fields["event"], fields["retry_at"]
        if blocked and event.workflow_run_id in blocked:
            continue
        if retry_at is not None and retry_at > now:  # ``_waiting``
            blocked.add(event.workflow_run_id)  # backing off: its later events wait
            continue
        try:
            if plugins:
                await _publish(deps, event)
            else:  # the common case, without a coroutine per event for the plugin loop
                await sink.publish(event)
        except Exception as exc:
            _failed(deps, record, exc, failures)
            blocked.add(event.workflow_run_id)
        else:
            published.append(fields["id"])


async def _publish_batched(
    deps: Deps,
    batch: list[OutboxRecord],
    published: list[int],
    failures: list[Failure],
    now: datetime,
) -> None:
    """A sink that takes batches (``batches`` is true, ``publish_batch(events)``): the
    batch in one call, in per-run order, without the runs still backing off. If it
    fails, nothing of it counts as published and each run's first event records the
    failure, as if that event had failed alone (its run's later events wait)."""
    waiting = {r.event.workflow_run_id for r in batch if _waiting(r, now)}
    batch = [r for r in batch if r.event.workflow_run_id not in waiting]
    events = [record.event for record in batch]
    if not events:
        return
    try:
        await deps.event_sink.publish_batch(events)  # type: ignore[attr-defined]
        for plugin in deps.plugins:
            for event in events:
                await plugin.on_event(event)
    except Exception as exc:
        seen: set[str] = set()
        for record in batch:
            if record.event.workflow_run_id not in seen:
                seen.add(record.event.workflow_run_id)
                _failed(deps, record, exc, failures)
    else:
        published.extend(record.id for record in batch)


async def flush(deps: Deps, cmd: c.OutboxFlush, scope: Scope) -> c.OutboxFlushResult:
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.OutboxFlushResult", cached)
        batch = await tx.outbox.unpublished(cmd.max_events)
    published: list[int] = []
    failures: list[Failure] = []
    now = deps.clock.now()
    if getattr(deps.event_sink, "batches", False):
        await _publish_batched(deps, batch, published, failures, now)
    else:
        await _publish_each(deps, batch, published, failures, now)
    result = c.OutboxFlushResult(
        published=len(published),
        failed=len(failures),
        dead_lettered=sum(1 for _, _, dead in failures if dead),
    )
    async with deps.persistence.transaction() as tx:
        if published:
            await tx.outbox.mark_published(published)
        for record, error, dead in failures:
            retry_at = None if dead else now + retry_delay(deps, record.attempts + 1)
            await tx.outbox.record_failure(record.id, error, dead_letter=dead, retry_at=retry_at)
        await scope.complete(tx, result)
    return result


async def replay_dlq(deps: Deps, cmd: c.PluginReplayDLQ, scope: Scope) -> c.PluginReplayDLQResult:
    """Put dead-lettered events (after the consumer is fixed), oldest first, back in the
    outbox with a fresh retry budget. The next ``outbox.flush`` publishes them with each
    run's other pending events, in per-run sequence order, as it publishes any event."""
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.PluginReplayDLQResult", cached)
        batch = await tx.outbox.dead_lettered(cmd.max_events)
        replayed = await tx.outbox.requeue_dead_letters([record.id for record in batch])
        result = c.PluginReplayDLQResult(replayed=replayed)
        await scope.complete(tx, result)
    if replayed:
        deps.logger.info("outbox.dlq_replayed", replayed=replayed)
    return result
