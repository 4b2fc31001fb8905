"""CollectingEventSink: keeps published events in order, for tests and the harness."""

from __future__ import annotations

from collections.abc import Callable

from treadle.kernel.events import EventBase


class CollectingEventSink:
    """``events`` holds what was published; ``fail_when`` makes chosen publishes raise."""

    def __init__(self) -> None:
        self.events: list[EventBase] = []
        self.fail_when: Callable[[EventBase], bool] | None = None

    async def publish(self, event: EventBase) -> None:
        if self.fail_when is not None and self.fail_when(event):
            raise ConnectionError(f"sink refused {event.type} #{event.sequence}")  # type: ignore[attr-defined]
        self.events.append(event)

    def of_run(self, run_id: str) -> list[EventBase]:
        return [e for e in self.events if e.workflow_run_id == run_id]

    def types(self, run_id: str | None = None) -> list[str]:
        events = self.events if run_id is None else self.of_run(run_id)
        return [e.type for e in events]  # type: ignore[attr-defined]
