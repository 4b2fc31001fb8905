"""The integrations' costs on this machine: webhook delivery (one POST per event and
batched) to a local receiver that verifies every signature, and S3 blob reads and
writes against a moto server (real HTTP on 127.0.0.1; moto is far faster and nearer
than S3, so these are the client's own costs, not S3's latency).

    .venv/bin/python benchmarks/integrations.py [--events 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel

from treadle import Engine, S3BlobStore, WebhookEventSink, WorkflowBuilder, define_stage
from treadle.adapters.webhook import verify_webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Num(BaseModel):
    n: int


@define_stage(id="step", input=Num, output=Num)
async def step(ctx: Any) -> Num:
    return Num(n=ctx.input.n)


WF = WorkflowBuilder("bench-hooks", input=Num).pipe(step).build()


def receiver() -> tuple[str, list[int]]:
    """A keep-alive HTTP/1.1 receiver on 127.0.0.1 that verifies each request."""
    posts = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            verify_webhook(body, dict(self.headers), SECRET)
            posts[0] += 1
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/hooks", posts


async def webhook(url: str, posts: list[int], *, batch: bool, runs: int) -> None:
    sink = WebhookEventSink(url, SECRET, allow="127.0.0.1", batch=batch)
    async with await Engine.open("memory://", workflows=[WF], event_sink=sink) as engine:
        for i in range(runs):
            await engine.start("bench-hooks", {"n": i})
        posts[0] = 0
        started, total = time.perf_counter(), 0
        while published := (
            await engine.kernel.dispatch({"type": "outbox.flush", "max_events": 100})
        ).published:
            total += published
        took = time.perf_counter() - started
    print(
        f"webhook batch={batch}: {total} events in {took:.2f} s = {total / took:,.0f} events/s, "
        f"{posts[0]} POSTs, {took / total * 1000:.2f} ms per event"
    )


async def s3() -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="treadle-bench")
    store = S3BlobStore("treadle-bench", "bench/", client=client)
    try:
        data = os.urandom(6 * 1024 * 1024)
        started = time.perf_counter()
        await store.put("big", data)
        put = time.perf_counter() - started
        started = time.perf_counter()
        assert await store.get("big") == data
        get = time.perf_counter() - started
        print(f"s3 6 MiB: put {put * 1000:.0f} ms, get {get * 1000:.0f} ms")
        started = time.perf_counter()
        for i in range(200):
            await store.put(f"small/{i}", b"x" * 1000)
        each = (time.perf_counter() - started) / 200
        print(f"s3 1 KB put, one at a time: {each * 1000:.1f} ms each")
        started = time.perf_counter()
        keys = await S3BlobStore("treadle-bench", "bench/", client=client, page_size=50).list(
            "small/"
        )
        took = time.perf_counter() - started
        print(f"s3 list {len(keys)} keys in pages of 50: {took * 1000:.0f} ms")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=500, help="events (one run start each)")
    args = parser.parse_args()
    url, posts = receiver()
    asyncio.run(webhook(url, posts, batch=False, runs=args.events))
    asyncio.run(webhook(url, posts, batch=True, runs=args.events))
    asyncio.run(s3())


if __name__ == "__main__":
    main()
