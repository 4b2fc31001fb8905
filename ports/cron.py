"""The CronCalendar port: which instants a cron expression names in a timezone.

The kernel decides what to fire (``kernel/schedules.py``); this port does the calendar
arithmetic it cannot do purely: parsing the expression and mapping wall-clock times to
instants through the timezone database, across DST changes. ``adapters/cron.py`` is the
croniter + zoneinfo implementation every host wires in.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class CronCalendar(Protocol):
    def check(self, expression: str, timezone: str) -> None:
        """``ValueError`` if the expression or the timezone is unusable; the message
        starts with ``timezone`` when the timezone is at fault."""

    def next_after(self, expression: str, timezone: str, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after`` (timezone-aware, UTC), ``None``
        if the expression never fires again."""

    def previous_before(self, expression: str, timezone: str, before: datetime) -> datetime | None:
        """The last fire time strictly before ``before`` (timezone-aware, UTC), ``None``
        if there is none."""
