"""Code-workflow durable timers in the in-memory adapter: the ``Timers`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

from datetime import datetime

from treadle.adapters.memory.persistence.shared import MemoryUnit
from treadle.kernel.model import (
    evolve,
)
from treadle.kernel.workflows.model import Timer


class MemoryTimers:
    """Durable timers on this transaction's store (``tx.timers``)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def schedule(self, timer: Timer) -> Timer:
        self._tx._check()
        s = self._s
        s.next_timer_id += 1
        stored = evolve(timer, {"id": s.next_timer_id, "fired_at": None})
        key = (timer.workflow_run_id, timer.name, timer.occurrence)
        self._tx.set_item(s.timers, key, stored)
        live = s.live_timers.get(timer.workflow_run_id, ())
        if key not in live:
            self._tx.set_item(s.live_timers, timer.workflow_run_id, (*live, key))
        return stored

    async def pending(self, run_id: str) -> list[Timer]:
        live = [self._s.timers[key] for key in self._s.live_timers.get(run_id, ())]
        return sorted(live, key=lambda t: (t.fire_at, t.id or 0))

    async def due(self, now: datetime, limit: int, *, purpose: str) -> list[Timer]:
        due = [
            t
            for t in self._s.timers.values()
            if t.fired_at is None and t.purpose == purpose and t.fire_at <= now
        ]
        return sorted(due, key=lambda t: (t.fire_at, t.id or 0))[:limit]

    async def fire(self, run_id: str, name: str, occurrence: int, fired_at: datetime) -> bool:
        self._tx._check()
        key = (run_id, name, occurrence)
        timer = self._s.timers.get(key)
        if timer is None or timer.fired_at is not None:
            return False
        self._tx.set_item(self._s.timers, key, evolve(timer, {"fired_at": fired_at}))
        left = tuple(k for k in self._s.live_timers.get(run_id, ()) if k != key)
        if left:
            self._tx.set_item(self._s.live_timers, run_id, left)
        else:
            self._tx.del_item(self._s.live_timers, run_id)
        return True
