"""The HTTP API under load: listing runs over a large table, and live-event latency.

1. ``GET /api/v1/runs?limit=50`` (and a filtered and a deep cursor page) over
   ``--runs`` runs (default 100,000) inserted in bulk with ``Engine.start_many``
   (``run.createMany``, 10,000 a batch): ``--requests`` sequential requests each, p50 / p95.
2. One SSE client on ``/api/v1/events?type=workflow:created``: the time from a run's
   commit (``start`` returned) to the client reading its event, ``--sse-samples``
   times, for a run started by *another* engine (its own connection pool, as a separate
   process would be: the event reaches the server by ``NOTIFY``) and by the server's
   own engine (told in-process).

The server is uvicorn in this process, reached over TCP by an httpx client that shares
its event loop, so the figures include the client's own time.

    .venv/bin/python benchmarks/http_api.py                  # PostgreSQL, 100,000 runs
    .venv/bin/python benchmarks/http_api.py --backend sqlite --runs 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

import httpx
from _common import Finished, counting_pipeline, fresh_database, pct

from treadle import Engine
from treadle.hosts.http import TokenAuth, create_app
from treadle.hosts.http.api.stream import hub_of

TOKEN = "bench-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def timed_gets(client: httpx.AsyncClient, path: str, n: int) -> list[float]:
    await client.get(path, headers=HEADERS)  # warm-up (plans, pool)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        response = await client.get(path, headers=HEADERS)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
    return samples


def line(label: str, samples: list[float]) -> str:
    return (
        f"  {label:44} p50 {pct(samples, 0.5):6.1f} ms   p95 {pct(samples, 0.95):6.1f} ms"
        f"   (n={len(samples)})"
    )


async def sse_latency(client: httpx.AsyncClient, starter: Engine, samples: int) -> list[float]:
    """Start ``samples`` runs one at a time with ``starter``; for each, the ms from the
    start's commit to the SSE client reading its ``workflow:created``."""
    seen: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    # From a known point: whenever the stream subscribes, it misses nothing after it.
    after = await starter.outbox.last_id()

    async def read() -> None:
        async with client.stream(
            "GET",
            f"/api/v1/events?type=workflow:created&after={after}",
            headers={**HEADERS, "Accept": "text/event-stream"},
            timeout=None,
        ) as response:
            async for text in response.aiter_lines():
                if text.startswith("data: "):
                    at = time.perf_counter()
                    run_id = text.split('"workflow_run_id":"', 1)[1].split('"', 1)[0]
                    seen.put_nowait((at, run_id))

    reader = asyncio.create_task(read())
    latencies = []
    try:
        for n in range(samples + 1):
            handle = await starter.start("listed", {"n": n})
            committed = time.perf_counter()
            while True:
                at, run_id = await asyncio.wait_for(seen.get(), 10)
                if run_id == handle.run_id:
                    break
            if n:  # the first one warms up (and may come from the stream's backlog)
                latencies.append((at - committed) * 1000)
            await asyncio.sleep(0.02)  # one run at a time, as a trickle
    finally:
        reader.cancel()
    return latencies


async def run_backend(name: str, args: argparse.Namespace) -> None:
    import uvicorn

    finished = Finished()
    wf = counting_pipeline("listed", 1, finished)
    with fresh_database(name, args.pg_url) as url:
        async with await Engine.open(url, workflows=[wf], auto_migrate=True) as engine:
            started = time.perf_counter()
            for offset in range(0, args.runs, 10_000):
                count = min(10_000, args.runs - offset)
                await engine.start_many(
                    [{"workflow_id": "listed", "input": {"n": offset + i}} for i in range(count)],
                    batch_size=10_000,
                )
            took = time.perf_counter() - started
            print(f"{name}: inserted {args.runs:,} runs in {took:.1f}s")
            if name == "postgres":
                import psycopg
                from _common import libpq_url

                with psycopg.connect(libpq_url(url), autocommit=True) as conn:
                    conn.execute("ANALYZE")
            app = create_app(engine, auth=TokenAuth({TOKEN: {"act"}}))
            port = free_port()
            config = uvicorn.Config(app, port=port, log_level="warning", lifespan="on")
            server = uvicorn.Server(config)
            serving = asyncio.create_task(server.serve())
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                page = (await client.get("/api/v1/runs?limit=50", headers=HEADERS)).json()
                for _ in range(100):  # 100 pages deep
                    page = (
                        await client.get(
                            f"/api/v1/runs?limit=50&cursor={page['next_cursor']}", headers=HEADERS
                        )
                    ).json()
                deep = page["next_cursor"]
                print(f"{name}: GET over {args.runs:,} runs, {args.requests} sequential requests")
                for label, path in (
                    ("/api/v1/runs?limit=50", "/api/v1/runs?limit=50"),
                    (
                        "...&status=PENDING&workflow_id=listed",
                        "/api/v1/runs?limit=50&status=PENDING&workflow_id=listed",
                    ),
                    ("...&cursor=<page 101>", f"/api/v1/runs?limit=50&cursor={deep}"),
                    ("/api/v1/runs/aggregate", "/api/v1/runs/aggregate"),
                ):
                    print(line(label, await timed_gets(client, path, args.requests)))
                hub = hub_of(app.state.treadle)
                await hub.wait_listening()
                async with await Engine.open(url, workflows=[wf]) as other:
                    remote = await sse_latency(client, other, args.sse_samples)
                local = await sse_latency(client, engine, args.sse_samples)
                print(f"{name}: SSE, commit to event read by one client")
                print(line("run started by another engine", remote))
                print(line("run started by the server's engine", local))
            await app.state.treadle.aclose()
            server.should_exit = True
            await serving
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


async def amain(args: argparse.Namespace) -> None:
    for name in ("sqlite", "postgres") if args.backend == "both" else (args.backend,):
        await run_backend(name, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["both", "sqlite", "postgres"], default="postgres")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--sse-samples", type=int, default=50)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
