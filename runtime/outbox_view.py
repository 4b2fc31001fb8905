"""``engine.outbox``: the engine's view of its event outbox beyond one run.

``engine.events(run_id)`` reads one run's events. What an operator or the HTTP server
needs of the outbox as a whole lives here: the dead-letter queue (events the event sink
would not take, and replaying them) and the all-runs feed behind ``/api/v1/events``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from treadle.kernel import commands as c
from treadle.kernel.arguments import build_command, count

if TYPE_CHECKING:
    from treadle.kernel.events import EventBase, OutboxRecord
    from treadle.kernel.kernel import Kernel


class OutboxView:
    """The outbox of one engine (``engine.outbox``); see the module docstring."""

    def __init__(self, kernel: Kernel, check_open: Callable[[], None]) -> None:
        self._kernel = kernel
        self._check_open = check_open

    async def dead_letters(self, limit: int = 100) -> list[OutboxRecord]:
        """Events the outbox gave up publishing to the event sink (the DLQ), oldest first,
        each with its attempts and last error. ``replay_dead_letters`` retries them."""
        self._check_open()
        n = count(limit, "limit", minimum=1, maximum=10_000)
        async with self._kernel.deps.persistence.transaction() as tx:
            return await tx.outbox.dead_lettered(n)

    async def replay_dead_letters(self, max_events: int = 100) -> int:
        """Put up to ``max_events`` dead-lettered events back in the outbox
        (``plugin.replayDLQ``); the next ``outbox.flush`` publishes them. How many."""
        self._check_open()
        command = build_command(c.PluginReplayDLQ, "replay_dead_letters", max_events=max_events)
        return (await self._kernel.dispatch(command)).replayed

    async def feed(self, after_id: int = 0, *, limit: int = 500) -> list[tuple[int, EventBase]]:
        """Events of every run appended after outbox row ``after_id``, each with its row
        id, in row order: the all-runs feed behind the HTTP server's ``/api/v1/events``
        (``adapters/event_feed.py``). On PostgreSQL ids are handed out before commit,
        so a row may appear after a higher one: readers that must not miss one wait a
        moment at a gap (the HTTP ``EventHub`` does)."""
        self._check_open()
        after = count(after_id, "after_id", minimum=0, maximum=2**62)
        n = count(limit, "limit", minimum=1, maximum=10_000)
        async with self._kernel.deps.persistence.transaction() as tx:
            return await tx.outbox.events_after(after, n)

    async def last_id(self) -> int:
        """The id of the newest outbox row (0 when none): where a live feed starts."""
        self._check_open()
        async with self._kernel.deps.persistence.transaction() as tx:
            return await tx.outbox.last_event_id()
