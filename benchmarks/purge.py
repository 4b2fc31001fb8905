"""Retention's purge: how fast ``run.purge`` deletes ended runs with all their rows.

Runs ``--runs`` three-stage pipelines to completion (with the in-process worker), then
times ``Engine.purge(older_than=0)`` in batches of ``--batch``: runs deleted per second,
and per batch the wall time. Each run leaves 3 stages, 3 jobs, 8 events and their
counter, and the idempotency records of its job executions.

    .venv/bin/python benchmarks/purge.py --backend both --runs 2000 --batch 100
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import timedelta

from _common import Finished, counting_pipeline, fresh_database

from treadle import Engine


async def run_backend(name: str, args: argparse.Namespace) -> None:
    finished = Finished()
    wf = counting_pipeline("purged", 3, finished)
    with fresh_database(name, args.pg_url) as url:
        async with await Engine.open(url, workflows=[wf], auto_migrate=True) as engine:
            finished.expect(args.runs)
            async with engine.worker(concurrency=64):
                await engine.start_many(
                    [{"workflow_id": "purged", "input": {"n": i}} for i in range(args.runs)]
                )
                await asyncio.wait_for(finished.event.wait(), timeout=600)
            # Leaving the worker drained it: the last stages' commits have landed.
            started = time.perf_counter()
            result = await engine.purge(timedelta(0), batch_size=args.batch)
            took = time.perf_counter() - started
    batches = -(-result.purged // args.batch)
    print(
        f"{name:8} purged {result.purged} runs in {took:.2f}s: {result.purged / took:,.0f} runs/s, "
        f"{1000 * took / max(batches, 1):.0f} ms per batch of {args.batch}"
    )


async def amain(args: argparse.Namespace) -> None:
    for name in ("sqlite", "postgres") if args.backend == "both" else (args.backend,):
        await run_backend(name, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["both", "sqlite", "postgres"], default="both")
    parser.add_argument("--runs", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
