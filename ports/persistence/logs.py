"""The logs concern of the Persistence port: stage log lines kept with the run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from treadle.kernel.model import LogRecord


class LogStore(Protocol):
    """Stage log lines, as seen by one unit of work (``tx.logs``)."""

    async def append(self, logs: Sequence[LogRecord]) -> None:
        """Store the log lines."""

    async def for_run(self, run_id: str) -> list[LogRecord]:
        """The run's log lines in the order they were written."""
