"""``CroniterCalendar``: the CronCalendar port on croniter and zoneinfo.

croniter matches the expression against *wall-clock* (naive local) times; this module
maps each match to the instants it names in the schedule's timezone, so DST changes
follow one rule (docs/schedules.md, "Daylight saving time"):

* a wall-clock time that does not exist (spring forward: 02:30 on the night clocks go
  from 02:00 to 03:00) fires once, shifted by the gap (03:30), as PEP 495's ``fold=0``
  reads it;
* a wall-clock time that occurs twice (fall back: 01:30) fires once, at its first
  occurrence, unless the expression's hour field is ``*`` (it fires every hour): then
  both occurrences fire, an hour apart, as the clock on the wall shows them.

croniter's own handling of aware datetimes fires a daily 01:30 twice on the night
clocks fall back; working on naive times avoids that.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter  # type: ignore[import-untyped]  # croniter ships no types

_SEARCH = 2000
"""Wall-clock matches examined per question before giving up (an expression such as
``0 0 30 2 *`` never fires: croniter itself stops after its own search limit)."""


@functools.lru_cache(maxsize=256)
def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone {timezone!r} is not a known IANA timezone") from None


_EPSILON = timedelta(microseconds=1)
_local = threading.local()


def _iterator(expression: str) -> Any:
    """A croniter for ``expression``, parsed once per thread and re-aimed with
    ``set_current`` for each question: parsing costs a millisecond, a step microseconds.
    Per thread, because an iterator is stateful; each use is synchronous (no await)."""
    cache: dict[str, Any] | None = getattr(_local, "iterators", None)
    if cache is None:
        cache = _local.iterators = {}
    it = cache.get(expression)
    if it is None:
        if len(cache) >= 256:
            cache.clear()
        it = cache[expression] = croniter(expression, datetime(2000, 1, 1))
    return it


@functools.lru_cache(maxsize=256)
def _every_hour(expression: str) -> bool:
    fields = expression.split()
    return len(fields) >= 2 and fields[1] == "*"


class CroniterCalendar:
    """Cron expressions (5 fields: minute hour day month weekday) in IANA timezones."""

    def check(self, expression: str, timezone: str) -> None:
        _zone(timezone)
        if not croniter.is_valid(expression):
            raise ValueError(f"cron expression {expression!r} is not valid")
        if len(expression.split()) != 5:
            raise ValueError(f"cron expression {expression!r} must have 5 fields")
        if self.next_after(expression, timezone, datetime.now(UTC)) is None:
            raise ValueError(f"cron expression {expression!r} never fires")

    def next_after(self, expression: str, timezone: str, after: datetime) -> datetime | None:
        zone = _zone(timezone)
        local = after.astimezone(zone)
        naive = local.replace(tzinfo=None, fold=0)
        for wall in self._walls(expression, naive, forward=True):
            found = [t for t in self._instants(expression, zone, wall) if t > after]
            if found:
                return min(found)
        return None

    def previous_before(self, expression: str, timezone: str, before: datetime) -> datetime | None:
        zone = _zone(timezone)
        local = before.astimezone(zone)
        naive = local.replace(tzinfo=None, fold=0)
        for wall in self._walls(expression, naive, forward=False):
            found = [t for t in self._instants(expression, zone, wall) if t < before]
            if found:
                return max(found)
        return None

    @staticmethod
    def _walls(expression: str, start: datetime, *, forward: bool) -> Iterator[datetime]:
        """``start`` itself if it matches (an ambiguous time's other occurrence may still
        lie ahead or behind), then the matching wall-clock times away from it."""
        it = _iterator(expression)
        try:
            it.set_current(start - _EPSILON, force=True)
            if it.get_next(datetime) == start:
                yield start
            it.set_current(start, force=True)
            for _ in range(_SEARCH):
                wall = it.get_next(datetime) if forward else it.get_prev(datetime)
                yield wall
        except Exception:  # croniter's own "no match within its search limit"
            return

    @staticmethod
    def _instants(expression: str, zone: ZoneInfo, wall: datetime) -> list[datetime]:
        """The instants (UTC) at which the wall-clock time ``wall`` fires."""
        first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
        if second > first and _every_hour(expression):
            return [first, second]  # occurs twice, and the schedule fires hourly
        return [first]  # normal, the first of two, or a time in a gap (shifted)
