"""Live events over Server-Sent Events (and the same events as JSON).

- ``GET /api/v1/runs/{id}/events``: one run's events. Each SSE message has
  ``id: <the run's event sequence>``, ``event: <type>`` (``stage:completed``, ...) and
  ``data: <the event as JSON>``. ``Last-Event-ID`` (or ``?after=N``) resumes after
  that sequence: the run's sequence is gap-free and committed in order, so nothing is
  missed or repeated. Without ``Accept: text/event-stream`` the answer is the JSON list
  of the run's events after ``after``.
- ``GET /api/v1/events?workflow_id=&type=``: every run's events, ``id: <outbox row
  id>``; ``type`` takes exact types or ``noun:*`` (repeat or comma-separate). Without
  ``Last-Event-ID`` / ``after`` it starts with the next event; with one it replays the
  stored events after it first.

Both are fed by the app's one ``EventHub`` (``hosts/http/events.py``): no polling loop
per client. ``max_events`` ends the stream after that many events (scripts, tests); a
``: keepalive`` comment goes out every ``KEEPALIVE`` seconds of silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from treadle.engine import Engine
from treadle.hosts.http.api.models import EventOut
from treadle.hosts.http.deps import get_engine, require_read
from treadle.hosts.http.events import EventHub, Subscription
from treadle.hosts.http.state import HttpState, http_state
from treadle.kernel.arguments import invalid
from treadle.kernel.events import EventBase

__all__ = ["KEEPALIVE", "hub_of", "router"]

KEEPALIVE: Final = 15.0
RETRY_MS: Final = 2_000
MAX_AFTER: Final = 2**62

router = APIRouter(tags=["events"], dependencies=[Depends(require_read)])
EngineDep = Annotated[Engine, Depends(get_engine)]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def hub_of(state: HttpState) -> EventHub:
    """The app's hub, made on first use."""
    if state.hub is None:
        state.hub = EventHub(state.engine)
    hub: EventHub = state.hub
    return hub


def _wants_sse(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _resume_point(last_event_id: str | None, after: int | None) -> int | None:
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not text.isdigit() or int(text) > MAX_AFTER:
            raise invalid("Last-Event-ID", f"must be an event id this stream sent, got {text!r}")
        return int(text)
    return after


def _message(cursor: int, event: EventBase) -> bytes:
    kind = str(getattr(event, "type", "event"))
    data = event.model_dump_json()
    return f"id: {cursor}\nevent: {kind}\ndata: {data}\n\n".encode()


def _type_filter(types: list[str] | None) -> tuple[frozenset[str], tuple[str, ...]] | None:
    if not types:
        return None
    exact: set[str] = set()
    prefixes: list[str] = []
    for index, item in enumerate(part.strip() for value in types for part in value.split(",")):
        if not item:
            continue
        if item.endswith(":*") and item.count(":") == 1:
            prefixes.append(item[:-1])
        elif ":" in item and "*" not in item:
            exact.add(item)
        else:
            raise invalid(f"type[{index}]", f"must be an event type or 'noun:*', got {item!r}")
    return frozenset(exact), tuple(prefixes)


def _type_ok(event: EventBase, types: tuple[frozenset[str], tuple[str, ...]] | None) -> bool:
    if types is None:
        return True
    kind = str(getattr(event, "type", ""))
    return kind in types[0] or kind.startswith(types[1])


async def _live(
    hub: EventHub,
    subscription: Subscription,
    backlog: AsyncIterator[tuple[int, EventBase]],
    seen: int,
    max_events: int | None,
    key: str,
) -> AsyncIterator[bytes]:
    """Backlog first, then the subscription's events past ``seen`` (by ``key``: the
    outbox ``id`` or the run's ``sequence``), with keep-alives."""
    sent = 0
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        async for cursor, event in backlog:
            yield _message(cursor, event)
            seen = max(seen, cursor)
            sent += 1
            if max_events is not None and sent >= max_events:
                return
        while True:
            try:
                item = await asyncio.wait_for(subscription.queue.get(), KEEPALIVE)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if item is None:
                return  # dropped as too slow, or the app is closing: the client resumes
            outbox_id, event = item
            cursor = outbox_id if key == "id" else event.sequence
            if cursor <= seen:
                continue
            seen = cursor
            yield _message(cursor, event)
            sent += 1
            if max_events is not None and sent >= max_events:
                return
    finally:
        hub.unsubscribe(subscription)


@router.get(
    "/runs/{run_id}/events",
    response_model=list[EventOut],
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def run_events(
    request: Request,
    engine: EngineDep,
    run_id: str,
    after: Annotated[int | None, Query(ge=0, le=MAX_AFTER, description="A sequence")] = None,
    max_events: Annotated[int | None, Query(ge=1)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse | list[EventOut]:
    """One run's events: an SSE stream with ``Accept: text/event-stream``, else JSON."""
    await engine.get_run(run_id, with_stages=False)  # 404 before anything streams
    start = _resume_point(last_event_id, after) or 0
    if not _wants_sse(request):
        events = [e async for e in engine.events(run_id, after_sequence=start)]
        if max_events is not None:
            events = events[:max_events]
        return [EventOut(id=e.sequence, event=e) for e in events]
    hub = hub_of(http_state(request))
    subscription, _ = await hub.subscribe(lambda _id, e, _wf: e.workflow_run_id == run_id)

    async def backlog() -> AsyncIterator[tuple[int, EventBase]]:
        # After subscribing: an event committed meanwhile is in both, and skipped once.
        async for event in engine.events(run_id, after_sequence=start):
            yield event.sequence, event

    stream = _live(hub, subscription, backlog(), start, max_events, "sequence")
    return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get(
    "/events",
    responses={200: {"content": {"text/event-stream": {}}}},
    response_class=StreamingResponse,
)
async def all_events(
    request: Request,
    engine: EngineDep,
    workflow_id: str | None = None,
    type: Annotated[
        list[str] | None, Query(description="Event types, or 'noun:*'; repeat for several")
    ] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_AFTER, description="An event id")] = None,
    max_events: Annotated[int | None, Query(ge=1)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Every run's events as an SSE stream, optionally of one workflow and some types."""
    types = _type_filter(type)
    start = _resume_point(last_event_id, after)
    hub = hub_of(http_state(request))

    def wants(_id: int, event: EventBase, workflow: str | None) -> bool:
        if workflow_id is not None and workflow != workflow_id:
            return False
        return _type_ok(event, types)

    subscription, horizon = await hub.subscribe(wants, needs_workflow=workflow_id is not None)

    async def backlog() -> AsyncIterator[tuple[int, EventBase]]:
        # Stored events in (start, horizon]; the hub hands over everything after horizon.
        cursor = start if start is not None else horizon
        while cursor < horizon:
            rows = await engine.outbox.feed(cursor, limit=1_000)
            for outbox_id, event in rows:
                if outbox_id > horizon:
                    return
                cursor = outbox_id
                workflow = await hub.workflow_of(event.workflow_run_id) if workflow_id else None
                if wants(outbox_id, event, workflow):
                    yield outbox_id, event
            if len(rows) < 1_000:
                return

    seen = horizon if start is None else start
    stream = _live(hub, subscription, backlog(), seen, max_events, "id")
    return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
