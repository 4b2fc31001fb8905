"""Row conversions, statements and helpers that several concern modules of the in-memory
adapter share.
"""

from __future__ import annotations

import bisect
import marshal
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
    Run,
)

_MISSING = object()


def _idempotency_record(
    stored: IdempotencyRecord | tuple[str, str, datetime, bytes] | None,
) -> IdempotencyRecord | None:
    """The record as the port returns it. A completed record is kept compacted: a tuple
    of strings, a datetime and its JSON result serialised to bytes (the SQL adapters
    keep it as JSON text), so the store holds no container the cyclic garbage collector
    has to walk for it (a thousand runs leave tens of thousands of completed records
    behind). An in-progress mark lives only until its command completes and stays a
    model. ``marshal``, not ``json``: the bytes never leave the process, and it costs a
    seventh of ``json.dumps`` for the per-stage ``job.execute`` result."""
    if stored is None or isinstance(stored, IdempotencyRecord):
        return stored
    key, command_type, started_at, result = stored
    return IdempotencyRecord(
        key=key,
        command_type=command_type,
        state=IdempotencyState.COMPLETED,
        result=marshal.loads(result),
        started_at=started_at,
    )


def _reject_duplicates(keys: Sequence[Any], what: str) -> None:
    """``ValueError`` if a key occurs twice: the second update of one call would always
    be stale, a caller's bug rather than a concurrent writer."""
    seen: set[Any] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"{what} {key!r} occurs more than once in one call")
        seen.add(key)


def _drop_last(bucket: list[Any]) -> None:
    bucket.pop()


def _in_id_order(index: dict[int, Any]) -> None:
    ordered = sorted(index.items())
    index.clear()
    index.update(ordered)


def _json_equal(stored: Any, wanted: Any) -> bool:
    """Equality of JSON values as the SQL adapters compare them: ``True`` is not ``1``
    (Python says it is), numbers compare by value, objects by content."""
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return type(stored) is type(wanted) and stored == wanted
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return stored.keys() == wanted.keys() and all(
            _json_equal(stored[k], wanted[k]) for k in stored
        )
    if isinstance(stored, list | tuple) and isinstance(wanted, list | tuple):
        return len(stored) == len(wanted) and all(map(_json_equal, stored, wanted))
    return bool(stored == wanted)


class EventFeed:
    """Every appended event with its outbox id, in id order (``events_after``): two
    parallel lists rather than one list of ``(id, event)`` pairs, so the store keeps no
    tuple per event for the cyclic garbage collector to walk (a list of ints holds
    nothing it tracks). The pairs are built only for the rows a reader asks for."""

    __slots__ = ("events", "ids")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.events: list[Any] = []

    def append(self, outbox_id: int, event: Any) -> None:
        self.ids.append(outbox_id)
        self.events.append(event)

    def drop_last(self, count: int) -> None:
        """Remove the last ``count`` rows (the undo of an append)."""
        if count:
            del self.ids[-count:]
            del self.events[-count:]

    def after(self, after_id: int, limit: int) -> list[tuple[int, Any]]:
        """Up to ``limit`` rows with an id above ``after_id``, oldest first."""
        start = bisect.bisect_right(self.ids, after_id)
        end = start + max(limit, 0)
        return list(zip(self.ids[start:end], self.events[start:end], strict=True))

    def last_id(self) -> int:
        return self.ids[-1] if self.ids else 0

    def rows(self) -> list[tuple[int, Any]]:
        return list(zip(self.ids, self.events, strict=True))

    def replace(self, rows: Sequence[tuple[int, Any]]) -> None:
        self.ids[:] = [row[0] for row in rows]
        self.events[:] = [row[1] for row in rows]

    def __len__(self) -> int:
        return len(self.ids)


class MemoryUnit(Protocol):
    """What the concern stores use of the ``InMemoryTransaction`` they belong to: stated
    here, so the concern modules import nothing of ``store``, which imports them."""

    _s: Any
    """The ``InMemoryPersistence`` (its state)."""
    _undo: list[tuple[Any, Any, Any]]
    active: bool
    ended_runs: list[str] | None
    appended_events: bool
    final_runs: dict[str, Run] | None

    def _check(self) -> None: ...

    def set_item(self, mapping: dict[Any, Any], key: Any, value: Any) -> None: ...

    def del_item(self, mapping: dict[Any, Any], key: Any) -> None: ...

    def on_rollback(self, fn: Callable[[], None]) -> None: ...
