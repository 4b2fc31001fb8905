"""``outbox.flush`` and ``plugin.replayDLQ``: publish committed events in per-run order.

Events are read in one transaction, published outside it (a slow sink never
holds a lock), and their fate recorded in a second. A run whose event fails stops
publishing for this flush (fail-fast), so its consumers never see a later event
before an earlier one; after ``outbox_max_attempts`` failures the event goes to
the dead-letter queue and the run's later events flow again. ``plugin.replayDLQ``
puts dead letters back in the outbox, for the next flush to publish.
"""

from __future__ import annotations

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


async def flush(deps: Deps, cmd: c.OutboxFlush, scope: Scope) -> c.OutboxFlushResult:
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.OutboxFlushResult", cached)
        batch = await tx.outbox.unpublished(cmd.max_events)
    published: list[int] = []
    failures: list[tuple[OutboxRecord, str, bool]] = []
    blocked: set[str] = set()
    sink, plugins = deps.event_sink, deps.plugins
    for record in batch:
        event = record.event
        run_id = event.workflow_run_id
        if run_id in blocked:
            continue
        try:
            if plugins:
                await _publish(deps, event)
            else:  # the common case, without a coroutine per event for the plugin loop
                await sink.publish(event)
        except Exception as exc:
            dead = record.attempts + 1 >= deps.settings.outbox_max_attempts
            failures.append((record, describe_exception(exc), dead))
            blocked.add(run_id)
            deps.logger.warning(
                "outbox.publish_failed",
                run_id=run_id,
                sequence=record.event.sequence,
                attempts=record.attempts + 1,
                dead_lettered=dead,
                error=describe_exception(exc),
            )
        else:
            published.append(record.id)
    result = c.OutboxFlushResult(
        published=len(published),
        failed=len(failures),
        dead_lettered=sum(1 for _, _, dead in failures if dead),
    )
    async with deps.persistence.transaction() as tx:
        if published:
            await tx.outbox.mark_published(published)
        for record, error, dead in failures:
            await tx.outbox.record_failure(record.id, error, dead_letter=dead)
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
