"""Live events over SSE: one run's stream and the all-runs stream, resumed with
``Last-Event-ID`` without gaps or duplicates, pushed as events commit."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from treadle.engine import Engine
from treadle.hosts.http import TokenAuth, create_app
from treadle.hosts.http.events import EventHub
from treadle.tests.http.conftest import AS_ACT, AS_READ, TOKENS, client_for
from treadle.tests.http.workflows import WORKFLOWS

API = "/api/v1"
SSE = {**AS_READ, "Accept": "text/event-stream"}


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The messages of an SSE body: each ``{"id": int, "event": str, "data": dict}``."""
    messages = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ": " not in line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            messages.append(
                {
                    "id": int(fields["id"]),
                    "event": fields["event"],
                    "data": json.loads(fields["data"]),
                }
            )
    return messages


async def stream(client: httpx.AsyncClient, path: str, **headers: str) -> list[dict[str, Any]]:
    response = await client.get(path, headers={**SSE, **headers})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


async def test_run_stream_resumes_after_last_event_id(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """Reading a run's stream in two connections, the second sending the first's last
    ``id`` as ``Last-Event-ID``, yields every event once, in sequence order."""
    run_id = (await engine.start("shout", {"item": "a"})).run_id
    await engine.handle(run_id).result(timeout=10)
    stored = [e.sequence async for e in engine.events(run_id)]
    first = await stream(client, f"{API}/runs/{run_id}/events?max_events=2")
    assert [m["id"] for m in first] == stored[:2]
    assert first[0]["event"] == "workflow:created"
    rest = await stream(
        client,
        f"{API}/runs/{run_id}/events?max_events={len(stored) - 2}",
        **{"Last-Event-ID": str(first[-1]["id"])},
    )
    assert [m["id"] for m in first + rest] == stored
    assert rest[-1]["event"] == "workflow:completed"
    assert rest[-1]["data"]["workflow_run_id"] == run_id


async def test_run_stream_pushes_events_committed_after_it_opened(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """A stream opened on a waiting run receives the events a later signal causes."""
    run_id = (await engine.start("steps", {"item": "a"})).run_id
    async for event in engine.events(run_id, follow=True, poll_interval=0.02):
        if event.type == "workflow:suspended":  # type: ignore[attr-defined]
            break
    last = max([e.sequence async for e in engine.events(run_id)])
    path = f"{API}/runs/{run_id}/events?after={last}&max_events=3"
    reader = asyncio.create_task(stream(client, path))
    await asyncio.sleep(0)  # let the request start; the events may land in either part
    await engine.signal(run_id, "go")
    received = await asyncio.wait_for(reader, 10)
    assert [m["id"] for m in received] == [last + 1, last + 2, last + 3]
    assert received[0]["event"] == "signal:received"


async def test_all_runs_stream_filters_by_workflow_and_type_and_resumes(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """``/events?workflow_id=&type=`` yields only matching events, ids ascending; a second
    connection resuming from the last id yields the rest, nothing twice."""
    shouts = [(await engine.start("shout", {"item": str(n)})).run_id for n in range(3)]
    other = (await engine.start("checkout", {"item": "x"})).run_id
    for run_id in shouts:
        await engine.handle(run_id).result(timeout=10)
    path = f"{API}/events?after=0&workflow_id=shout&type=workflow:completed&max_events=2"
    first = await stream(client, path)
    assert [m["event"] for m in first] == ["workflow:completed"] * 2
    rest = await stream(
        client,
        f"{API}/events?workflow_id=shout&type=workflow:*&max_events=1",
        **{"Last-Event-ID": str(first[-1]["id"])},
    )
    ids = [m["id"] for m in first + rest]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    runs = [m["data"]["workflow_run_id"] for m in first + rest]
    assert sorted(runs) == sorted(shouts)
    assert other not in runs


async def test_all_runs_stream_pushes_new_events(client: httpx.AsyncClient, engine: Engine) -> None:
    """Without a resume point the all-runs stream starts at the next event and delivers
    it as it commits."""
    reader = asyncio.create_task(stream(client, f"{API}/events?type=workflow:created&max_events=1"))
    state = client._transport.app.state.treadle  # type: ignore[attr-defined]
    state.hub = EventHub(engine)
    await asyncio.wait_for(state.hub.wait_for_subscriber(), 10)
    run_id = (await engine.start("shout", {"item": "new"})).run_id
    received = await asyncio.wait_for(reader, 10)
    assert [m["data"]["workflow_run_id"] for m in received] == [run_id]


async def test_bad_resume_point_and_unknown_run(client: httpx.AsyncClient) -> None:
    """A ``Last-Event-ID`` that is not an id is a 422 naming it; an unknown run is 404."""
    bad = await client.get(f"{API}/events", headers={**SSE, "Last-Event-ID": "abc"})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "Last-Event-ID"
    assert (await client.get(f"{API}/runs/nope/events", headers=SSE)).status_code == 404
    bad_type = await client.get(f"{API}/events?type=weird", headers=SSE)
    assert bad_type.status_code == 422


@pytest.mark.parametrize("storage_url", ["postgres"], indirect=True)
async def test_postgres_stream_is_pushed_by_notify_from_another_process(
    engine: Engine, storage_url: str
) -> None:
    """On PostgreSQL an event committed by another engine (another connection pool, as a
    separate worker process would be) reaches the stream through LISTEN/NOTIFY: the
    hub's fallback poll is set to an hour, so only the notification can deliver it."""
    app = create_app(engine, auth=TokenAuth(TOKENS))
    hub = EventHub(engine, poll_interval=3600)
    app.state.treadle.hub = hub
    await hub.wait_listening()
    async with (
        client_for(app) as client,
        await Engine.open(storage_url, workflows=WORKFLOWS) as other,
    ):
        reader = asyncio.create_task(stream(client, f"{API}/events?max_events=1"))
        await asyncio.wait_for(hub.wait_for_subscriber(), 10)
        run_id = (await other.start("checkout", {"item": "remote"})).run_id
        received = await asyncio.wait_for(reader, 10)
    await hub.aclose()
    assert received[0]["event"] == "workflow:created"
    assert received[0]["data"]["workflow_run_id"] == run_id


async def test_act_token_reads_streams_too(client: httpx.AsyncClient, engine: Engine) -> None:
    """Streams need the ``read`` scope, which ``act`` includes; no token is a 401."""
    run_id = (await engine.start("shout", {"item": "a"})).run_id
    await engine.handle(run_id).result(timeout=10)
    ok = await client.get(
        f"{API}/runs/{run_id}/events?max_events=1",
        headers={**AS_ACT, "Accept": "text/event-stream"},
    )
    assert ok.status_code == 200
    denied = await client.get(
        f"{API}/runs/{run_id}/events", headers={"Accept": "text/event-stream"}
    )
    assert denied.status_code == 401


async def test_many_streams_share_one_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five clients streaming all events cost one feed read per commit, not one per
    client per commit, and an idle hub (no client) reads nothing."""
    async with await Engine.open("memory://", workflows=WORKFLOWS) as engine:
        reads: list[int] = []
        real = engine.outbox.feed

        async def counting(after_id: int = 0, *, limit: int = 500) -> Any:
            reads.append(after_id)
            return await real(after_id, limit=limit)

        monkeypatch.setattr(engine.outbox, "feed", counting)
        app = create_app(engine, auth=TokenAuth(TOKENS))
        hub = EventHub(engine)
        app.state.treadle.hub = hub
        async with client_for(app) as client:
            readers = [
                asyncio.create_task(stream(client, f"{API}/events?max_events=3")) for _ in range(5)
            ]
            while hub.subscribers < 5:
                await hub.wait_for_subscriber()
                await asyncio.sleep(0)
            for n in range(3):
                await engine.start("shout", {"item": str(n)})  # no worker: one event each
            results = await asyncio.wait_for(asyncio.gather(*readers), 10)
        assert all(len(r) == 3 for r in results)
        assert len({tuple(m["id"] for m in r) for r in results}) == 1
        assert len(reads) <= 3 + 1  # one read per commit (and one that found nothing)
        before = len(reads)
        await engine.start("shout", {"item": "nobody listens"})
        await asyncio.sleep(0.05)
        assert len(reads) == before
        await hub.aclose()


async def test_postgres_writer_can_turn_the_event_notify_off(treadle_postgres_url: str) -> None:
    """A writer with ``persistence.notify_events = False`` sends no NOTIFY: its event
    reaches the stream only at the hub's next read (here forced by ``poke``). No worker
    runs, so no other commit can wake the hub."""
    server = await Engine.open(treadle_postgres_url, workflows=WORKFLOWS)
    other = await Engine.open(treadle_postgres_url, workflows=WORKFLOWS)
    app = create_app(server, auth=TokenAuth(TOKENS))
    hub = EventHub(server, poll_interval=3600)
    app.state.treadle.hub = hub
    await hub.wait_listening()
    async with server, other, client_for(app) as client:
        assert other.backend is not None
        other.backend.persistence.notify_events = False  # type: ignore[attr-defined]
        path = f"{API}/events?type=workflow:created&max_events=1"
        reader = asyncio.create_task(stream(client, path))
        await asyncio.wait_for(hub.wait_for_subscriber(), 10)
        run_id = (await other.start("checkout", {"item": "quiet"})).run_id
        done, _ = await asyncio.wait({reader}, timeout=0.5)
        assert not done  # no notification came
        hub.poke()
        received = await asyncio.wait_for(reader, 10)
        await hub.aclose()
    assert received[0]["data"]["workflow_run_id"] == run_id


async def test_hub_holds_back_rows_after_a_gap_until_it_fills_or_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As on PostgreSQL, where row 2 can commit after row 3: the hub hands out row 1,
    holds row 3 while row 2 is missing, and delivers 2 then 3 once 2 appears; a gap that
    never fills (a rolled-back id) is skipped after ``gap_wait``."""
    async with await Engine.open("memory://", workflows=WORKFLOWS) as engine:
        for n in range(4):
            await engine.start("shout", {"item": str(n)})  # outbox rows 1-4
        rows = await engine.outbox.feed(0)
        hidden = {2, 4}

        async def feed(after_id: int = 0, *, limit: int = 500) -> Any:
            return [r for r in rows if r[0] > after_id and r[0] not in hidden][:limit]

        async def last() -> int:
            return 0

        monkeypatch.setattr(engine.outbox, "feed", feed)
        monkeypatch.setattr(engine.outbox, "last_id", last)
        hub = EventHub(engine, gap_wait=0.3)
        subscription, horizon = await hub.subscribe(lambda *_: True)
        assert horizon == 0
        hub.poke()
        first = await asyncio.wait_for(subscription.queue.get(), 5)
        assert first is not None
        assert first[0] == 1
        hidden.discard(2)  # the late commit lands
        hub.poke()
        got = [await asyncio.wait_for(subscription.queue.get(), 5) for _ in range(2)]
        assert [item[0] for item in got if item is not None] == [2, 3]
        hidden.clear()
        rows.append((6, rows[3][1]))  # row 5 never commits: a permanent gap
        hidden.add(5)
        hub.poke()
        got = [await asyncio.wait_for(subscription.queue.get(), 5) for _ in range(2)]
        assert [item[0] for item in got if item is not None] == [4, 6]
        await hub.aclose()


async def test_postgres_hub_asks_for_notifications_only_while_it_has_streams(
    treadle_postgres_url: str,
) -> None:
    """Writers send ``NOTIFY treadle_events`` only while a reader is announced
    (``adapters/sql/wake_interest.py``): the hub announces itself in ``event_readers``
    before its first stream subscribes, and withdraws once the last one is gone; then
    another engine's commits send no NOTIFY."""
    import psycopg

    from treadle.adapters.sql import sync_url

    dsn = sync_url(treadle_postgres_url).set(drivername="postgresql")
    libpq = dsn.render_as_string(hide_password=False)

    async def readers() -> int:
        async with await psycopg.AsyncConnection.connect(libpq, autocommit=True) as conn:
            row = await (await conn.execute("SELECT count(*) FROM event_readers")).fetchone()
        assert row is not None
        return int(row[0])

    async with (
        await Engine.open(treadle_postgres_url, workflows=WORKFLOWS) as server,
        await Engine.open(treadle_postgres_url, workflows=WORKFLOWS) as other,
        await psycopg.AsyncConnection.connect(libpq, autocommit=True) as listener,
    ):
        await listener.execute("LISTEN treadle_events")
        hub = EventHub(server, poll_interval=3600)
        assert await readers() == 0
        subscription, _ = await hub.subscribe(lambda *_: True)
        assert await readers() == 1
        await other.start("checkout", {"item": "heard"})
        assert [n.channel async for n in listener.notifies(timeout=2)] == ["treadle_events"]
        hub.unsubscribe(subscription)
        hub.poke()  # the reader loop sees no stream left and withdraws
        deadline = asyncio.get_running_loop().time() + 10
        while await readers():
            assert asyncio.get_running_loop().time() < deadline, "the hub never withdrew"
        await other.start("checkout", {"item": "unheard"})
        assert [n.channel async for n in listener.notifies(timeout=0.5)] == []
        await hub.aclose()


async def test_postgres_hub_stays_announced_when_its_reader_loop_runs_during_a_subscribe(
    treadle_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first ``subscribe`` starts the hub's reader loop, which (seeing no stream yet)
    withdraws any announcement; the subscribe announces before registering its stream,
    with awaits in between. The loop running in that gap must not withdraw the
    announcement the subscribe just made: writers would send no NOTIFY to a hub with a
    stream until its next renewal (a bug: the withdrawal won the race about one run in
    two)."""
    async with await Engine.open(treadle_postgres_url, workflows=WORKFLOWS) as server:
        persistence: Any = server.kernel.deps.persistence
        calls: list[str] = []
        real_announce = persistence.announce_event_reader
        real_withdraw = persistence.withdraw_event_reader

        async def announce(reader_id: str, ttl: float) -> None:
            calls.append("announce")
            await real_announce(reader_id, ttl)

        async def withdraw(reader_id: str) -> None:
            calls.append("withdraw")
            await real_withdraw(reader_id)

        real_last_id = server.outbox.last_id

        async def slow_last_id() -> int:
            for _ in range(20):  # the reader loop gets every chance to run meanwhile
                await asyncio.sleep(0.01)
            return await real_last_id()

        monkeypatch.setattr(persistence, "announce_event_reader", announce)
        monkeypatch.setattr(persistence, "withdraw_event_reader", withdraw)
        monkeypatch.setattr(server.outbox, "last_id", slow_last_id)
        hub = EventHub(server, poll_interval=3600)
        try:
            await hub.subscribe(lambda *_: True)
            assert calls == ["announce"]
        finally:
            await hub.aclose()
