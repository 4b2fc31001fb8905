"""``treadle demo``: the example document pipeline, for real, in a few seconds.

Runs ``treadle.examples.document_pipeline`` (``examples/document_pipeline.py``, shipped
in the package) on an embedded SQLite file with an in-process worker: three documents
go through extract-text, a parallel group (sentiment and keywords; keywords fails its
first attempt and is retried with backoff), a batch stage that suspends until its job
is ready and resumes, and an aggregate. Live progress bars show each run; afterwards it
prints each run's results and what the engine did (retries, suspensions, parallel
stages), read back from the stored runs and events. Exit 0 only when every run completed.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from treadle.hosts.cli.common import (
    EXIT_FAILURE,
    console,
    fail,
    quiet_logger,
    run_async,
    seconds_option,
)
from treadle.hosts.cli.render import elapsed, fmt_duration, status_text, truncate
from treadle.kernel.events import EventBase
from treadle.kernel.model import Run, RunStatus
from treadle.runtime.options import WorkerOptions

EXAMPLE_MODULE = "treadle.examples.document_pipeline"
WORKER_OPTIONS = WorkerOptions(
    orchestration_interval=0.2,  # how often suspended stages are checked
    job_poll_interval=0.05,
    stale_lease_threshold=30.0,
)
"""Short intervals so the demo's real time stays small; production uses DESIGN's defaults."""


def _example() -> Any:
    try:
        return importlib.import_module(EXAMPLE_MODULE)
    except ImportError as exc:
        fail(f"the demo's workflow {EXAMPLE_MODULE} is missing from this install ({exc})")


def _overlap(run: Run, a: str, b: str) -> bool:
    stages = {s.stage_id: s for s in run.stages}
    first, second = stages.get(a), stages.get(b)
    if first is None or second is None:
        return False
    a_start, a_end = first.started_at, first.completed_at
    b_start, b_end = second.started_at, second.completed_at
    if a_start is None or a_end is None or b_start is None or b_end is None:
        return False
    return a_start < b_end and b_start < a_end


def _document(run: Run) -> str:
    url = run.input.get("url") if isinstance(run.input, dict) else None
    return str(url).rstrip("/").rsplit("/", 1)[-1] if url else run.id


def results_table(runs: list[Run], events: dict[str, list[EventBase]]) -> Table:
    """One row per run: outcome, what was retried or suspended, and the output."""
    table = Table(title="results", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("doc", "status", "took", "retried", "susp", "sentiment"):
        table.add_column(column, no_wrap=True)
    table.add_column("keywords", overflow="fold")
    table.add_column("translation", no_wrap=True)
    for run in runs:
        output = run.output if isinstance(run.output, dict) else {}
        keywords = output.get("keywords")
        retried = [f"{s.stage_id} x{s.attempt}" for s in run.stages if s.attempt > 1]
        suspended = sum(
            1 for e in events.get(run.id, []) if getattr(e, "type", "") == "stage:suspended"
        )
        table.add_row(
            _document(run),
            status_text(run.status),
            fmt_duration(elapsed(run.started_at, run.completed_at)),
            ", ".join(retried) or "-",
            str(suspended),
            str(output.get("label", "")),
            truncate(", ".join(map(str, keywords)) if isinstance(keywords, list) else "", 40),
            truncate(output.get("translated"), 20),
        )
    return table


def story(runs: list[Run], events: dict[str, list[EventBase]]) -> list[str]:
    """What the engine did, read back from the stored runs and events."""
    n = len(runs)
    kinds: Counter[str] = Counter(
        str(getattr(e, "type", "")) for run_events in events.values() for e in run_events
    )
    retried = sum(
        1 for run in runs for s in run.stages if s.stage_id == "keywords" and s.attempt > 1
    )
    resumed = sum(
        1
        for run in runs
        for s in run.stages
        if s.stage_id == "translate" and s.status.value == "COMPLETED"
    )
    parallel = sum(1 for run in runs if _overlap(run, "sentiment", "keywords"))
    return [
        f"retry:    keywords failed its first attempt and succeeded after backoff "
        f"in {retried}/{n} runs ({kinds['stage:failed']} stage:failed events)",
        f"suspend:  translate suspended {kinds['stage:suspended']}x and resumed when its "
        f"batch job was ready in {resumed}/{n} runs",
        f"parallel: sentiment and keywords overlapped in time in {parallel}/{n} runs",
        f"events:   {sum(kinds.values())} committed to the outbox, "
        f"{kinds['workflow:completed']} workflow:completed",
    ]


async def run_demo(url: str, out: Console, *, max_wait: float) -> tuple[list[Run], dict[str, Any]]:
    from treadle.engine import Engine
    from treadle.hosts.cli.progress import watch_runs

    example = _example()
    logger = quiet_logger()
    async with await Engine.open(url, workflows=[example.pipeline], logger=logger) as engine:
        async with engine.worker(WORKER_OPTIONS, logger=logger):
            handles = [
                await engine.start("document-processor", {"url": doc}) for doc in example.DOCUMENTS
            ]
            labels = {h.run_id: doc for h, doc in zip(handles, example.DOCUMENTS, strict=True)}
            runs = await watch_runs(
                engine, [h.run_id for h in handles], out, labels=labels, max_wait=max_wait
            )
        events = {run.id: await engine.kernel.events(run.id) for run in runs}
    return runs, events


def demo(
    db_file: Annotated[
        Path | None,
        typer.Option(
            "--file", help="Keep the demo's SQLite database here (default: a temporary file)."
        ),
    ] = None,
    timeout: Annotated[
        float, seconds_option("Give up after this many seconds.", at_least=1)
    ] = 25.0,
    ai: Annotated[
        bool,
        typer.Option(
            "--ai",
            help="Run the AI example instead (a fake model, real prices): every call's "
            "tokens and cost, a retried rate limit, a budget stop. Needs the ai extra.",
        ),
    ] = False,
) -> None:
    """Run the example document pipeline on SQLite with live progress, then show results
    (--ai: the AI pipeline, with its calls and costs)."""
    out = console()
    if ai:
        _ai_demo(out, db_file, timeout)
        return
    with tempfile.TemporaryDirectory(prefix="treadle-demo-") as tmp:
        path = db_file if db_file is not None else Path(tmp) / "treadle-demo.db"
        url = f"sqlite:///{path.resolve()}"
        where = (
            f"in {path}"
            if db_file is not None
            else "in a temporary file, deleted on exit (--file PATH keeps it)"
        )
        out.print(
            Text.assemble(("Treadle demo", "bold"), f": the document pipeline on SQLite {where}")
        )
        out.print(
            "extract-text → [sentiment ∥ keywords (fails once, retried)] → "
            "translate (batch: suspends, resumes) → aggregate\n"
        )
        started = time.monotonic()

        async def go() -> tuple[list[Run], dict[str, Any]]:
            return await run_demo(url, out, max_wait=timeout)

        runs, events = run_async(go)
    took = time.monotonic() - started
    out.print(results_table(runs, events))
    for line in story(runs, events):
        out.print(line)
    done = sum(1 for run in runs if run.status is RunStatus.COMPLETED)
    out.print(f"\n{done}/{len(runs)} runs completed in {took:.1f}s")
    if db_file is not None:
        out.print(f"the runs are kept in {path}; inspect them: treadle runs list --db {url}")
    if done != len(runs):
        raise typer.Exit(EXIT_FAILURE)


def _ai_demo(out: Console, db_file: Path | None, timeout: float) -> None:
    from treadle.hosts.cli.ai_demo import run_ai_demo, show

    with tempfile.TemporaryDirectory(prefix="treadle-demo-") as tmp:
        path = db_file if db_file is not None else Path(tmp) / "treadle-ai-demo.db"
        url = f"sqlite:///{path.resolve()}"
        out.print(
            Text.assemble(
                ("Treadle AI demo", "bold"),
                ": summarise → classify on a fake gpt-4o-mini (real prices, no network)",
            )
        )
        out.print("every model call is recorded with its tokens and cost; one run has a budget\n")

        async def go() -> Any:
            return await run_ai_demo(url, out, max_wait=timeout)

        runs, calls, by_model = run_async(go)
        ok = show(out, runs, calls, by_model)
    if db_file is not None:
        out.print(f"the runs are kept in {path}: treadle costs --db {url}")
    if not ok:
        raise typer.Exit(EXIT_FAILURE)
