"""The dashboard's routes: server-rendered pages (Jinja2, autoescaped), htmx partials,
two Server-Sent Event streams for the live parts, and the action forms.

Pages need a principal that may read; a browser without a session is sent to
``/login``. Actions are form POSTs that depend on ``require_act``, which checks the
``act`` scope, the app's ``read_only`` flag and the CSRF token, so a read-only token
gets 403 even for a forged form. Every action answers with a redirect back to the page
(303, Post/Redirect/Get) or, on a Treadle error, with the page's error box and the
error's HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Final

import jinja2
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from markupsafe import Markup
from starlette.datastructures import QueryParams

from treadle.hosts.http.auth import Principal
from treadle.hosts.http.csrf import CSRF_FIELD, csrf_token
from treadle.hosts.http.dashboard import data
from treadle.hosts.http.deps import authenticate, require_act
from treadle.hosts.http.state import http_state
from treadle.kernel.errors import RunNotFoundError, TreadleError
from treadle.kernel.model import RunStatus

if TYPE_CHECKING:
    from treadle.engine import Engine
    from treadle.hosts.http.events import EventHub
    from treadle.kernel.events import EventBase

__all__ = [
    "STATIC_FILES",
    "dashboard_router",
    "run_event_stream",
    "runs_change_stream",
    "templates",
]

STATIC_FILES: Final = {
    "htmx.min.js": "text/javascript",
    "htmx-ext-sse.min.js": "text/javascript",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
"""The files under ``/static/`` (shipped in the wheel as package data)."""

_COALESCE: Final = 0.25
"""Seconds the runs table's stream waits after an event, so a burst is one refresh."""
_KEEPALIVE: Final = 15.0

Actor = Annotated[Principal, Depends(require_act)]
"""A caller who may act: the ``act`` scope, the app not read-only, the CSRF token checked."""


def templates() -> jinja2.Environment:
    """The dashboard's Jinja2 environment: package templates, autoescape always on."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("treadle.hosts.http", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pretty"] = data.pretty
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    return env


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _root(request: Request) -> str:
    root = request.scope.get("root_path", "")
    return root if isinstance(root, str) else ""


def dashboard_router(env: jinja2.Environment | None = None) -> APIRouter:
    """The dashboard as a FastAPI ``APIRouter``; ``create_app`` includes it last (it owns
    ``/``). The engine and auth come from the app's ``HttpState``."""
    env = env or templates()
    router = APIRouter(include_in_schema=False)

    def render(
        request: Request, name: str, principal: Principal, status: int = 200, **context: Any
    ) -> HTMLResponse:
        state = http_state(request)
        can_act = principal.has("act") and not state.read_only
        page = env.get_template(name).render(
            request=request,
            root=_root(request),
            csrf_field=CSRF_FIELD,
            csrf=csrf_token(request),
            can_act=can_act,
            read_only=state.read_only,
            principal=principal,
            signed_in=principal.via == "session",
            now=datetime.now(UTC),
            statuses=[s.value for s in RunStatus],
            **context,
        )
        return HTMLResponse(page, status_code=status)

    def guard(request: Request) -> Principal | Response:
        """The caller if it may read; otherwise a redirect to ``/login`` (htmx: an
        ``HX-Redirect`` so the whole page goes there)."""
        principal = authenticate(request)
        if principal is not None and principal.has("read"):
            return principal
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": _login_url(request)})
        return RedirectResponse(_login_url(request), status_code=303)

    # -- runs -----------------------------------------------------------------------
    @router.get("/", response_class=HTMLResponse)
    async def runs_page(request: Request) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        engine = http_state(request).engine
        filters, problems = _filters(request.query_params)
        table = await _runs_table(engine, filters, problems)
        return render(
            request,
            "runs.html",
            who,
            active="runs",
            workflows=_workflow_ids(engine),
            query=_query_string(filters),
            **table,
        )

    @router.get("/ui/runs-table", response_class=HTMLResponse)
    async def runs_table(request: Request) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        filters, problems = _filters(request.query_params)
        table = await _runs_table(http_state(request).engine, filters, problems)
        return render(request, "_runs_table.html", who, query=_query_string(filters), **table)

    @router.get("/ui/stream")
    async def runs_stream(request: Request) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        return _sse(request, runs_change_stream(_hub(request)))

    # -- one run --------------------------------------------------------------------
    @router.get("/runs/{run_id}", response_class=HTMLResponse)
    async def run_detail(request: Request, run_id: str) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        try:
            page = await data.run_page(http_state(request).engine, run_id, now=datetime.now(UTC))
        except RunNotFoundError as exc:
            return render(request, "error.html", who, status=404, error=exc)
        return render(
            request,
            "run.html",
            who,
            active="runs",
            page=page,
            gantt=Markup(page.gantt),  # SVG from charts.py: its texts are escaped there
            last_sequence=max((e.sequence for e in page.events), default=0),
            event_rows=[_event_row(e) for e in page.events[-EVENTS_SHOWN:]],
            events_hidden=max(len(page.events) - EVENTS_SHOWN, 0),
            message=request.query_params.get("done", ""),
        )

    @router.get("/runs/{run_id}/panel", response_class=HTMLResponse)
    async def run_panel(request: Request, run_id: str) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        page = await data.run_page(http_state(request).engine, run_id, now=datetime.now(UTC))
        return render(
            request,
            "_run_panel.html",
            who,
            page=page,
            gantt=Markup(page.gantt),  # SVG from charts.py: its texts are escaped there
        )

    @router.get("/runs/{run_id}/stream")
    async def run_stream(request: Request, run_id: str) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        engine = http_state(request).engine
        await engine.get_run(run_id, with_stages=False)
        after = _last_event_id(request)
        event_row = env.get_template("_event_row.html")

        def fragment(event: EventBase) -> str:
            return event_row.render(row=_event_row(event), root=_root(request))

        return _sse(request, run_event_stream(_hub(request), engine, run_id, after, fragment))

    # -- actions --------------------------------------------------------------------
    async def act(
        request: Request,
        principal: Principal,
        run_id: str,
        call: Callable[[], Awaitable[tuple[str, str]]],
        *,
        back: str = "",
    ) -> Response:
        """Run ``call`` (which returns the page to go to and what was done) and redirect
        there (303); a Treadle error renders the error page with its HTTP status."""
        try:
            where, done = await call()
        except TreadleError as exc:
            from treadle.hosts.http.errors import status_for

            return render(
                request, "error.html", principal, status=status_for(exc), error=exc, run_id=run_id
            )
        page = back or f"/runs/{urllib.parse.quote(where)}"
        return RedirectResponse(
            f"{_root(request)}{page}?done={urllib.parse.quote(done)}", status_code=303
        )

    @router.post("/ui/start")
    async def start(
        request: Request,
        principal: Actor,
        workflow_id: Annotated[str, Form()],
        input: Annotated[str, Form()] = "",
        idempotency_key: Annotated[str, Form()] = "",
    ) -> Response:
        engine = http_state(request).engine

        async def go() -> tuple[str, str]:
            handle = await engine.start(
                workflow_id, _json_field(input, "input"), idempotency_key=idempotency_key or None
            )
            return handle.run_id, "started"

        return await act(request, principal, "", go)

    @router.post("/runs/{run_id}/cancel")
    async def cancel(
        request: Request,
        run_id: str,
        principal: Actor,
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        engine = http_state(request).engine

        async def go() -> tuple[str, str]:
            why = reason or f"cancelled from the dashboard by {principal.name}"
            if await engine.cancel(run_id, why):
                return run_id, "cancelled"
            return run_id, "nothing to cancel: the run had already ended"

        return await act(request, principal, run_id, go)

    @router.post("/runs/{run_id}/signal")
    async def signal(
        request: Request,
        run_id: str,
        principal: Actor,
        name: Annotated[str, Form()],
        payload: Annotated[str, Form()] = "",
    ) -> Response:
        engine = http_state(request).engine

        async def go() -> tuple[str, str]:
            await engine.signal(run_id, name, _json_field(payload, "payload"))
            return run_id, f"signal {name} sent"

        return await act(request, principal, run_id, go)

    @router.post("/runs/{run_id}/rerun")
    async def rerun(
        request: Request, run_id: str, principal: Actor, stage_id: Annotated[str, Form()]
    ) -> Response:
        engine = http_state(request).engine

        async def go() -> tuple[str, str]:
            await engine.rerun_from(run_id, stage_id)
            return run_id, f"re-running from {stage_id}"

        return await act(request, principal, run_id, go)

    @router.post("/runs/{run_id}/fork")
    async def fork(
        request: Request, run_id: str, principal: Actor, from_step: Annotated[str, Form()]
    ) -> Response:
        engine = http_state(request).engine

        async def go() -> tuple[str, str]:
            forked = await engine.fork(run_id, from_step)
            return forked.run_id, f"forked from {run_id} at {from_step}"

        return await act(request, principal, run_id, go)

    @router.post("/runs/{run_id}/review")
    async def decide(
        request: Request,
        run_id: str,
        principal: Actor,
        review_id: Annotated[str, Form()],
        decision: Annotated[str, Form()],
        comment: Annotated[str, Form()] = "",
        back: Annotated[str, Form()] = "",
    ) -> Response:
        engine = http_state(request).engine

        async def go() -> tuple[str, str]:
            if decision not in ("approved", "rejected"):
                from treadle.kernel.arguments import invalid

                raise invalid("decision", f"must be 'approved' or 'rejected', got {decision!r}")
            recorded = await engine.decide_review(
                run_id,
                review_id,
                "approved" if decision == "approved" else "rejected",
                reviewer=principal.name,
                comment=comment or None,
            )
            return run_id, decision if recorded else "nothing: the review was already decided"

        return await act(
            request, principal, run_id, go, back="/reviews" if back == "reviews" else ""
        )

    @router.post("/ui/dlq/replay")
    async def replay_dlq(request: Request, principal: Actor) -> Response:
        engine = http_state(request).engine
        try:
            replayed = await engine.replay_dead_letters(max_events=1_000)
        except TreadleError as exc:
            from treadle.hosts.http.errors import status_for

            return render(request, "error.html", principal, status=status_for(exc), error=exc)
        done = urllib.parse.quote(f"{replayed} events put back in the outbox")
        return RedirectResponse(f"{_root(request)}/queues?done={done}", status_code=303)

    # -- other pages ----------------------------------------------------------------
    @router.get("/reviews", response_class=HTMLResponse)
    async def reviews(request: Request) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        found = await data.pending_reviews(http_state(request).engine)
        return render(
            request,
            "reviews.html",
            who,
            active="reviews",
            back="reviews",
            reviews=found,
            message=request.query_params.get("done", ""),
        )

    @router.get("/queues", response_class=HTMLResponse)
    async def queues(request: Request) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        page = await data.queues_page(http_state(request).engine)
        return render(
            request,
            "queues.html",
            who,
            active="queues",
            page=page,
            message=request.query_params.get("done", ""),
        )

    @router.get("/throughput", response_class=HTMLResponse)
    async def throughput(request: Request) -> Response:
        who = guard(request)
        if isinstance(who, Response):
            return who
        from treadle.hosts.http.dashboard.charts import render_throughput

        buckets, capped = await data.throughput(http_state(request).engine, now=datetime.now(UTC))
        return render(
            request,
            "throughput.html",
            who,
            active="throughput",
            chart=Markup(render_throughput(buckets)),  # numbers and escaped labels only
            completed=sum(b.completed for b in buckets),
            failed=sum(b.failed for b in buckets),
            capped=capped,
        )

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        media = STATIC_FILES.get(name)
        if media is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body = resources.files("treadle.hosts.http").joinpath("static", name).read_bytes()
        return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=3600"})

    return router


def _login_url(request: Request) -> str:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    if request.headers.get("hx-request"):
        target = request.headers.get("hx-current-url", target)
        target = urllib.parse.urlsplit(target).path or "/"
    return f"{_root(request)}/login?next={urllib.parse.quote(target)}"


def _json_field(text: str, field: str) -> Any:
    """A form field holding JSON; empty means ``None``. Bad JSON names the field."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        from treadle.kernel.arguments import invalid

        raise invalid(field, f"must be JSON: {exc.msg} at line {exc.lineno}") from None


# -- the runs table -------------------------------------------------------------------
PAGE_SIZE: Final = 50
EVENTS_SHOWN: Final = 500
"""The run page lists a run's newest events up to this many (the timeline uses all)."""
SINCE: Final = {
    "1h": timedelta(hours=1),
    "24h": timedelta(days=1),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
"""The runs page's ``since`` choices: runs created within that long."""


def _filters(params: QueryParams) -> tuple[dict[str, Any], list[str]]:
    """The runs page's filters from the query string: ``status`` (repeated),
    ``workflow_id``, ``attr`` (``key=value``, the value JSON or text), ``page``."""
    problems: list[str] = []
    statuses = [s.upper() for s in params.getlist("status") if s]
    valid = {s.value for s in RunStatus}
    bad = [s for s in statuses if s not in valid]
    if bad:
        problems.append(f"status: unknown {', '.join(bad)}")
    statuses = [s for s in statuses if s in valid]
    attributes: dict[str, Any] = {}
    raw_attr = params.get("attr", "") or ""
    if raw_attr.strip():
        key, sep, value = raw_attr.partition("=")
        if not sep or not key.strip():
            problems.append("attr: must be key=value")
        else:
            try:
                attributes[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                attributes[key.strip()] = value
    since = params.get("since", "") or ""
    if since and since not in SINCE:
        problems.append(f"since: must be one of {', '.join(SINCE)}")
        since = ""
    try:
        page = max(int(params.get("page", "0") or 0), 0)
    except ValueError:
        problems.append("page: must be a number")
        page = 0
    return {
        "status": statuses,
        "workflow_id": (params.get("workflow_id") or "").strip() or None,
        "attr": raw_attr.strip(),
        "attributes": attributes,
        "since": since,
        "page": page,
    }, problems


def _query_string(filters: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, str]] = [("status", s) for s in filters["status"]]
    if filters["workflow_id"]:
        pairs.append(("workflow_id", filters["workflow_id"]))
    if filters["attr"]:
        pairs.append(("attr", filters["attr"]))
    if filters["since"]:
        pairs.append(("since", filters["since"]))
    return urllib.parse.urlencode(pairs)


async def _runs_table(
    engine: Engine, filters: Mapping[str, Any], problems: list[str]
) -> dict[str, Any]:
    since = SINCE.get(filters["since"])
    common = {
        "workflow_id": filters["workflow_id"],
        "attributes": filters["attributes"] or None,
        "created_after": datetime.now(UTC) - since if since is not None else None,
    }
    try:
        runs = await engine.list(
            status=filters["status"] or None,
            limit=PAGE_SIZE + 1,
            offset=filters["page"] * PAGE_SIZE,
            **common,
        )
        counts = await engine.aggregate("status", **common)
    except TreadleError as exc:
        problems = [*problems, str(exc)]
        runs, counts = [], {}
    return {
        "runs": runs[:PAGE_SIZE],
        "more": len(runs) > PAGE_SIZE,
        "page": filters["page"],
        "counts": counts,
        "total": sum(counts.values()),
        "filters": filters,
        "problems": problems,
    }


def _workflow_ids(engine: Engine) -> list[str]:
    registry = engine.kernel.deps.registry
    try:
        return sorted({wf.id for wf in registry})  # type: ignore[attr-defined]
    except TypeError:  # a registry that cannot list its workflows
        return []


# -- live streams ---------------------------------------------------------------------
def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0


def _sse(request: Request, source: AsyncIterator[tuple[str, str, str | None]]) -> Response:
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
                done, _ = await asyncio.wait({pending}, timeout=_KEEPALIVE)
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


def _hub(request: Request) -> EventHub:
    """The app's shared event reader (the one the JSON API's SSE streams use): pushed on
    PostgreSQL (LISTEN/NOTIFY) and by this process's commits, one shared poll for other
    processes' commits on SQLite. The dashboard's streams add no polling loop of their own."""
    from treadle.hosts.http.api.stream import hub_of

    return hub_of(http_state(request))


async def run_event_stream(
    hub: EventHub, engine: Engine, run_id: str, after: int, fragment: Any
) -> AsyncIterator[tuple[str, str, str | None]]:
    """A run's events after sequence ``after`` as table rows (``event: run-event``, the
    sequence as the SSE id, so a reconnect resumes), each batch followed by a
    ``changed`` notice that makes the page refresh its status, timeline and payloads."""
    subscription, _ = await hub.subscribe(lambda _id, e, _wf: e.workflow_run_id == run_id)
    try:
        seen = after
        # Stored events first (subscribed before reading: nothing falls in between).
        backlog = [e async for e in engine.events(run_id, after_sequence=seen)]
        while True:
            batch = [e for e in backlog if e.sequence > seen]
            for event in sorted(batch, key=lambda e: e.sequence):
                seen = event.sequence
                yield "run-event", fragment(event), str(event.sequence)
            if batch:
                yield "changed", str(seen), None
            item = await subscription.queue.get()
            if item is None:  # the hub dropped this stream: the browser reconnects
                return
            fresh = sorted(
                (e for e in [item[1], *_drain(subscription)] if e.sequence > seen),
                key=lambda e: e.sequence,
            )
            if [e.sequence for e in fresh] != list(range(seen + 1, seen + 1 + len(fresh))):
                # A gap (committed before the hub's cursor, after the backlog read): the
                # run's sequence is gap-free in storage, so read them from there.
                fresh = [e async for e in engine.events(run_id, after_sequence=seen)]
            backlog = fresh
    finally:
        hub.unsubscribe(subscription)


def _drain(subscription: Any) -> list[EventBase]:
    out = []
    while not subscription.queue.empty():
        item = subscription.queue.get_nowait()
        if item is not None:
            out.append(item[1])
    return out


async def runs_change_stream(hub: EventHub) -> AsyncIterator[tuple[str, str, str | None]]:
    """A ``changed`` notice on connecting, then after any run's events, at most every
    ``_COALESCE`` seconds (the ones in between fold into the next); the runs table then
    fetches itself again."""
    subscription, _ = await hub.subscribe(lambda _id, _e, _wf: True)
    try:
        # Runs may have changed between the page's render and this subscription: one
        # refresh now closes that window.
        yield "changed", "runs", None
        while True:
            if await subscription.queue.get() is None:
                return
            await asyncio.sleep(_COALESCE)  # fold a burst of events into one refresh
            _drain(subscription)
            yield "changed", "runs", None
    finally:
        hub.unsubscribe(subscription)


def _event_row(event: EventBase) -> dict[str, Any]:
    """How the events table shows one event: its fields other than the common ones and
    a traceback (the run page shows that in the error box), as text (escaped by the
    template)."""
    fields = event.model_dump(
        mode="json",
        exclude={"type", "workflow_run_id", "sequence", "causation_id", "timestamp", "traceback"},
    )
    detail = ", ".join(
        f"{k}={json.dumps(v, ensure_ascii=False)}"
        for k, v in fields.items()
        if v not in (None, [], {})
    )
    kind = getattr(event, "type", "event")
    tone = (
        "bad"
        if kind.endswith(("failed", "cancelled", "terminated"))
        else "good"
        if kind.endswith("completed")
        else ""
    )
    return {
        "sequence": event.sequence,
        "type": kind,
        "timestamp": event.timestamp,
        "detail": detail if len(detail) <= 600 else detail[:599] + "…",
        "tone": tone,
    }
