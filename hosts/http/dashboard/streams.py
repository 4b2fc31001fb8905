"""The dashboard's live parts: Server-Sent Event streams that htmx's SSE extension
listens to.

Both streams read from the app's ``EventHub``, the one shared event reader the JSON
API's streams use (pushed on PostgreSQL by LISTEN/NOTIFY and by this process's commits;
one shared poll for other processes' commits on SQLite), so a browser adds no polling
loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from treadle.hosts.http.state import http_state

if TYPE_CHECKING:
    from treadle.engine import Engine
    from treadle.hosts.http.events import EventHub, Subscription
    from treadle.kernel.events import EventBase

__all__ = ["hub_for", "last_event_id", "run_event_stream", "runs_change_stream", "sse"]

SseItem = tuple[str, str, "str | None"]
"""``(event, data, id)`` of one Server-Sent Event."""

COALESCE: Final = 0.25
"""Seconds the runs table's stream waits after an event, so a burst is one refresh."""
KEEPALIVE: Final = 15.0
"""Seconds of quiet after which a stream sends a comment (proxies close idle ones)."""


def last_event_id(request: Request) -> int:
    """Where a run stream resumes: the ``Last-Event-ID`` an ``EventSource`` sends on
    reconnecting, else the ``after`` the page put in the URL."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0


def sse(request: Request, source: AsyncIterator[SseItem]) -> Response:
    """Serve ``source``'s ``(event, data, id)`` triples as ``text/event-stream``, with a
    keep-alive comment when nothing happened for a while, until the client goes."""

    async def body() -> AsyncIterator[bytes]:
        iterator = source.__aiter__()
        pending: asyncio.Future[tuple[str, str, str | None]] | None = None
        try:
            while not await request.is_disconnected():
                # One read stays pending across keep-alives: cancelling it would end
                # the source (an async generator does not survive a cancelled step).
                if pending is None:
                    pending = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                item, pending = pending, None
                try:
                    name, payload, ident = item.result()
                except StopAsyncIteration:
                    return
                lines = [f"event: {name}"]
                if ident is not None:
                    lines.append(f"id: {ident}")
                lines.extend(f"data: {line}" for line in payload.splitlines() or [""])
                yield ("\n".join(lines) + "\n\n").encode()
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def hub_for(request: Request) -> EventHub:
    """The app's shared event reader (the one the JSON API's SSE streams use): pushed on
    PostgreSQL (LISTEN/NOTIFY) and by this process's commits, one shared poll for other
    processes' commits on SQLite. The dashboard's streams add no polling loop of their own."""
    from treadle.hosts.http.api.stream import hub_of

    return hub_of(http_state(request))


async def run_event_stream(
    hub: EventHub,
    engine: Engine,
    run_id: str,
    after: int,
    fragment: Callable[[EventBase], str],
) -> AsyncIterator[SseItem]:
    """A run's events after sequence ``after`` as table rows (``event: run-event``, the
    sequence as the SSE id, so a reconnect resumes), each batch followed by a
    ``changed`` notice that makes the page refresh its status, timeline and payloads."""
    subscription, _ = await hub.subscribe(lambda _id, e, _wf: e.workflow_run_id == run_id)
    try:
        seen = after
        # Stored events first (subscribed before reading: nothing falls in between).
        backlog = [e async for e in engine.events(run_id, after_sequence=seen)]
        ended = False
        while True:
            batch = [e for e in backlog if e.sequence > seen]
            for event in sorted(batch, key=lambda e: e.sequence):
                seen = event.sequence
                yield "run-event", fragment(event), str(event.sequence)
            if batch:
                yield "changed", str(seen), None
            if ended:  # the hub dropped this stream (too slow, or closing): reconnect
                return
            item = await subscription.queue.get()
            if item is None:
                return
            queued, ended = _drain(subscription)
            fresh = sorted(
                (e for e in [item[1], *queued] if e.sequence > seen), key=lambda e: e.sequence
            )
            if [e.sequence for e in fresh] != list(range(seen + 1, seen + 1 + len(fresh))):
                # A gap (committed before the hub's cursor, after the backlog read): the
                # run's sequence is gap-free in storage, so read them from there.
                fresh = [e async for e in engine.events(run_id, after_sequence=seen)]
            backlog = fresh
    finally:
        hub.unsubscribe(subscription)


def _drain(subscription: Subscription) -> tuple[list[EventBase], bool]:
    """The events already queued for ``subscription``, and whether the hub ended it."""
    out: list[EventBase] = []
    while not subscription.queue.empty():
        item = subscription.queue.get_nowait()
        if item is None:
            return out, True
        out.append(item[1])
    return out, False


async def runs_change_stream(hub: EventHub) -> AsyncIterator[SseItem]:
    """A ``changed`` notice on connecting, then after any run's events, at most every
    ``COALESCE`` seconds (the ones in between fold into the next); the runs table then
    fetches itself again."""
    subscription, _ = await hub.subscribe(lambda _id, _e, _wf: True)
    try:
        # Runs may have changed between the page's render and this subscription: one
        # refresh now closes that window.
        yield "changed", "runs", None
        while True:
            if await subscription.queue.get() is None:
                return
            await asyncio.sleep(COALESCE)  # fold a burst of events into one refresh
            _, ended = _drain(subscription)
            yield "changed", "runs", None
            if ended:
                return
    finally:
        hub.unsubscribe(subscription)
