"""Remote workers (issue 18, item 3): how soon a waiting lease gets a job, and the cost
of one remote stage over HTTP.

A server (``create_app`` on uvicorn, loopback) and an in-process worker for
the local stages share an engine; a remote worker long-polls ``/lease`` and completes
each job at once. For ``--samples`` runs of ``split`` (local) -> ``shout`` (remote) ->
``join`` (local), one at a time:

* ``lease wait``: from the local commit that queued the remote job (``stage:completed``
  of ``split``) to the lease call answering with it, i.e. how the long-poll learns of
  new work: PostgreSQL's ``LISTEN/NOTIFY`` versus SQLite's poll every ``poll_interval``;
* ``remote stage``: from that commit to the remote ``complete`` answered (lease, begin,
  complete: three HTTP round trips and their transactions);
* ``run``: ``engine.start`` to the run's result.

    .venv/bin/python benchmarks/remote_lease.py --db sqlite:///bench.db --samples 30
    .venv/bin/python benchmarks/remote_lease.py --db postgresql+psycopg://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
from typing import Any

import httpx
import uvicorn

from treadle import Engine
from treadle.hosts.http import create_app
from treadle.tests.hosts.test_remote_workers import WF


def _summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{name:>13}: p50 {statistics.median(ms):7.1f} ms  p99 {p99:7.1f} ms  max {ms[-1]:7.1f} ms"
    )


async def main(db: str, samples: int) -> None:
    engine = await Engine.open(db, workflows=[WF])
    app = create_app(engine)  # open access, on loopback
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    waits: list[float] = []
    stages: list[float] = []
    runs: list[float] = []
    async with engine, engine.worker(), httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
            await asyncio.sleep(0.01)
        for _ in range(samples):
            lease = asyncio.create_task(
                client.post("/api/v1/workers/bench/lease", json={"wait": 30})
            )
            await asyncio.sleep(0.05)  # the lease is waiting before the run starts
            began = time.time()
            handle = await engine.start("shouter", {"text": "a b c"})
            response = await lease
            leased_at = time.time()
            (job,) = response.json()["jobs"]
            done = await client.post(
                "/api/v1/workers/bench/complete",
                json={
                    "job_id": job["job_id"],
                    "lease_token": job["lease_token"],
                    "output": {"words": job["input"]["words"]},
                },
            )
            completed_at = time.time()
            assert done.json()["outcome"] == "completed", done.text
            await handle.result(timeout=30)
            ended = time.time()
            events: list[Any] = [e async for e in engine.events(handle.run_id)]
            split_done = next(
                e for e in events if e.type == "stage:completed" and e.stage_id == "split"
            )
            queued_at = split_done.timestamp.timestamp()  # the engine's clock: wall time
            waits.append(leased_at - queued_at)
            stages.append(completed_at - queued_at)
            runs.append(ended - began)
    server.should_exit = True
    await serving
    print(f"{db.split(':')[0]}, {samples} samples")
    print(_summary("lease wait", waits))
    print(_summary("remote stage", stages))
    print(_summary("run", runs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="sqlite:///remote_lease_bench.db")
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.db, args.samples))
