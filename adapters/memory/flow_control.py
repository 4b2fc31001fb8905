"""In-memory FlowControl: counts over the store's runs. The persistence's one lock
already serialises transactions, so ``lock`` has nothing to do."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from treadle.kernel.flow_control import FlowKey, Usage, keys_of_run, tally
from treadle.kernel.model import Run, RunStatus

_HOLDING = (RunStatus.RUNNING, RunStatus.SUSPENDED)


class InMemoryFlowControl:
    def __init__(self, runs: Iterable[Run]) -> None:
        self._runs = runs

    async def lock(self, keys: Sequence[FlowKey]) -> None:
        return None

    async def usage(
        self, keys: Sequence[FlowKey], windows: Mapping[FlowKey, datetime]
    ) -> dict[FlowKey, Usage]:
        wanted = set(keys)
        active: dict[FlowKey, int] = {}
        starts: dict[FlowKey, list[datetime]] = {}
        for run in self._runs:
            for key in keys_of_run(run.workflow_id, run.concurrency_key):
                if key not in wanted:
                    continue
                if run.status in _HOLDING:
                    active[key] = active.get(key, 0) + 1
                since = windows.get(key)
                if since is not None and run.started_at is not None and run.started_at > since:
                    starts.setdefault(key, []).append(run.started_at)
        return tally(keys, active, starts)
