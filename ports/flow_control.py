"""The FlowControl port: what a claim needs to enforce concurrency and rate limits.

Reached as ``tx.flow`` inside a transaction: ``run.claimPending`` locks the keys of the
limited runs it is about to start, then counts their usage, so two claimers (in any
processes) never both see the last free slot. Where the database admits one writer at
a time (SQLite, memory) the transaction itself is the lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from treadle.kernel.flow_control import FlowKey, Usage


class FlowControl(Protocol):
    async def lock(self, keys: Sequence[FlowKey]) -> None:
        """Hold ``keys`` until the transaction ends; callers pass them sorted, so two
        claimers never wait on each other in opposite orders."""

    async def usage(
        self, keys: Sequence[FlowKey], windows: Mapping[FlowKey, datetime]
    ) -> dict[FlowKey, Usage]:
        """For each key: its runs holding a slot (RUNNING or SUSPENDED; a ``None``
        concurrency key counts every run of the workflow) and, for the keys in
        ``windows``, the runs started after that key's time (a window of ``per`` ending
        now), with the oldest of them."""
