"""Example app: a document-processing pipeline.

extract-text -> [sentiment, keywords] (parallel; keywords fails once and is retried)
-> translate (a batch stage: submits a job, suspends, resumes when it is ready)
-> aggregate (reads earlier outputs with ctx.require).

Two ways to run it:

- ``bash scripts/demo.sh`` (``treadle demo``): three documents on a real SQLite file
  with an in-process worker and live progress bars, in a few seconds of real time;
- ``python examples/document_pipeline.py``: the same app on the in-memory test
  harness with a virtual clock, printing each run's stage timeline.

Delays are short (a fraction of a second) so the demo finishes quickly in real
time; ``SIMULATED_LATENCY`` stands in for the network calls a real app makes.
As an app for the CLI: ``treadle --app treadle.examples.document_pipeline:pipeline``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import (
    NotReady,
    Ready,
    RetryPolicy,
    StageContext,
    Suspend,
    WorkflowBuilder,
    define_batch_stage,
    define_stage,
)

SIMULATED_LATENCY = 0.15
"""Seconds each simulated remote call takes."""

DOCUMENTS = {
    "https://example.com/launch": "Treadle launches today. Durable workflows are great and fast.",
    "https://example.com/outage": "The outage was bad. Customers were angry and the fix was slow.",
    "https://example.com/notes": "Notes on queues, leases, retries and outboxes for workflows.",
}


class UrlIn(BaseModel):
    url: str


class TextOut(BaseModel):
    text: str
    word_count: int
    url: str = ""


class ExtractConfig(BaseModel):
    max_length: int = 50_000


class Sentiment(BaseModel):
    score: float
    label: str


class Keywords(BaseModel):
    keywords: list[str]


class Translation(BaseModel):
    language: str
    text: str


class Summary(BaseModel):
    url: str
    label: str
    keywords: list[str]
    translated: str


@define_stage(id="extract-text", input=UrlIn, output=TextOut, config=ExtractConfig)
async def extract_text(ctx: StageContext[UrlIn, ExtractConfig]) -> TextOut:
    text = DOCUMENTS.get(ctx.input.url, "")[: ctx.config.max_length]
    pages = 4
    for page in range(1, pages + 1):
        await asyncio.sleep(SIMULATED_LATENCY)  # fetching a page
        ctx.progress(page / pages, f"page {page}/{pages}")
    await ctx.artifacts.put("raw.txt", text)
    return TextOut(text=text, word_count=len(text.split()), url=ctx.input.url)


POSITIVE = {"great", "fast", "launches", "durable"}
NEGATIVE = {"bad", "angry", "slow", "outage"}


@define_stage(id="sentiment", input=TextOut, output=Sentiment)
def sentiment(ctx: StageContext[TextOut, None]) -> Sentiment:
    """A sync stage: runs in a worker thread, off the event loop."""
    time.sleep(2 * SIMULATED_LATENCY)  # a blocking model call
    words = [w.strip(".,").lower() for w in ctx.input.text.split()]
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return Sentiment(score=float(score), label=label)


_flaky_calls: Counter[str] = Counter()


@define_stage(
    id="keywords",
    input=TextOut,
    output=Keywords,
    retry=RetryPolicy(max_attempts=3, initial_delay=0.3, backoff=2.0),
)
async def keywords(ctx: StageContext[TextOut, None]) -> Keywords:
    """Fails on its first attempt per run to show retries with backoff."""
    _flaky_calls[ctx.run_id] += 1
    await asyncio.sleep(SIMULATED_LATENCY)
    if ctx.attempt == 1:
        raise ConnectionError("keyword service timed out")
    words = sorted({w.strip(".,").lower() for w in ctx.input.text.split() if len(w) > 6})
    return Keywords(keywords=words[:5])


class FakeBatchApi:
    """Stands in for a remote batch service: a job is ready on its second status check.

    A check in another process (``treadle tick``) learns the job from the suspended
    state, so the example also works with separate worker and tick processes."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}

    def submit(self, job_id: str, text: str) -> None:
        self.jobs.setdefault(job_id, {"text": text, "checks": 0})

    def status(self, job_id: str, text: str) -> str | None:
        job = self.jobs.setdefault(job_id, {"text": text, "checks": 0})
        job["checks"] += 1
        return job["text"].upper() if job["checks"] >= 2 else None


batch_api = FakeBatchApi()


@define_batch_stage(id="translate", input="none", output=Translation)
async def translate(ctx: StageContext[Any, None]) -> Translation | Suspend:
    """Submits a translation job and suspends; the check below resumes it.
    The stable idempotency key makes a retried submission harmless."""
    text = ctx.require("extract-text").text
    batch_api.submit(ctx.idempotency_key, text)
    return Suspend(
        state={"job": ctx.idempotency_key, "text": text},
        poll_interval=timedelta(seconds=0.4),
        max_wait=timedelta(minutes=10),
    )


@translate.check_completion
async def translate_ready(state: dict[str, Any], ctx: StageContext[Any, None]) -> Any:
    text = batch_api.status(state["job"], state["text"])
    if text is None:
        return NotReady()
    return Ready(output=Translation(language="fr", text=text))


@define_stage(id="aggregate", input="none", output=Summary)
async def aggregate(ctx: StageContext[Any, None]) -> Summary:
    return Summary(
        url=ctx.require("extract-text").url,
        label=ctx.require("sentiment").label,
        keywords=ctx.require("keywords").keywords,
        translated=ctx.require("translate").text[:24],
    )


pipeline = (
    WorkflowBuilder("document-processor", input=UrlIn, description="Extract, analyse, translate")
    .pipe(extract_text)
    .parallel([sentiment, keywords])
    .pipe(translate)
    .pipe(aggregate)
    .build()
)


async def main() -> None:
    from treadle.testing import TestEngine

    engine = TestEngine([pipeline])
    handles = [await engine.start("document-processor", {"url": url}) for url in DOCUMENTS]
    # Virtual time: retries back off and the batch stage polls without real waiting.
    await engine.advance_time(timedelta(minutes=5))
    for handle in handles:
        run = await engine.get_run(handle.run_id)
        print(f"run {run.id} {run.status.value} in {run.duration} (virtual)")
        for stage in run.stages:
            print(
                f"  [{stage.execution_group}] {stage.stage_id:<13} {stage.status.value:<9} "
                f"attempts={stage.attempt}"
            )
        print(f"  output: {run.output}")
    kinds = Counter(e.type for e in engine.events)  # type: ignore[attr-defined]
    print("events:", dict(sorted(kinds.items())))
    failed = [
        h.run_id for h in handles if (await engine.get_run(h.run_id)).status.value != "COMPLETED"
    ]
    if failed:
        raise SystemExit(f"runs did not complete: {failed}")


if __name__ == "__main__":
    asyncio.run(main())
