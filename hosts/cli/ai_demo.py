"""``treadle demo --ai``: the example AI pipeline on SQLite, with every call's cost.

Runs ``treadle.examples.ai_pipeline`` (a fake pydantic-ai model priced as gpt-4o-mini by
genai-prices; no network, no key) with an in-process worker: three documents go through
summarise and classify (the memo's first request is rate limited and retried), and a
fourth run starts with a budget its first call uses up, so the engine stops it before
the next call. Afterwards it prints each run's cost and tokens, the AI calls of the run
that was retried, and the costs by model, read back from storage. Exit 0 when the three
documents completed and the budgeted run failed with ``BudgetExceededError``.
"""

from __future__ import annotations

import importlib
from decimal import Decimal
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from treadle.hosts.cli.common import fail, quiet_logger
from treadle.hosts.cli.render import (
    ai_calls_table,
    costs_table,
    elapsed,
    fmt_cost,
    fmt_duration,
    status_text,
    truncate,
)
from treadle.kernel.ai import AICall, AICostRow
from treadle.kernel.model import Run, RunStatus
from treadle.runtime.options import WorkerOptions

EXAMPLE_MODULE = "treadle.examples.ai_pipeline"
BUDGET = Decimal("0.00001")
"""The fourth run's max_cost: less than two calls of the fake gpt-4o-mini."""
WORKER_OPTIONS = WorkerOptions(
    orchestration_interval=0.2, job_poll_interval=0.05, stale_lease_threshold=30.0
)


def _example() -> Any:
    try:
        import pydantic_ai  # noqa: F401 - only to say which extra is missing
    except ImportError:
        fail("treadle demo --ai needs the ai extra: pip install 'treadle[ai]'")
    return importlib.import_module(EXAMPLE_MODULE)


async def run_ai_demo(
    url: str, out: Console, *, max_wait: float
) -> tuple[list[Run], dict[str, list[AICall]], list[AICostRow]]:
    from treadle.engine import Engine
    from treadle.hosts.cli.progress import watch_runs

    example = _example()
    example.reset_fake_model()
    logger = quiet_logger()
    async with await Engine.open(url, workflows=[example.pipeline], logger=logger) as engine:
        async with engine.worker(WORKER_OPTIONS, logger=logger):
            labels: dict[str, str] = {}
            for name, text in example.DOCUMENTS.items():
                handle = await engine.start("ai-documents", {"name": name, "text": text})
                labels[handle.run_id] = name
            budgeted = await engine.start(
                "ai-documents",
                {"name": "budgeted", "text": "A long report. It has many pages."},
                max_cost=BUDGET,
            )
            labels[budgeted.run_id] = "budgeted"
            runs = await watch_runs(engine, list(labels), out, labels=labels, max_wait=max_wait)
        calls = {run.id: await engine.ai_calls(run.id) for run in runs}
        by_model = await engine.ai_costs("model")
    return runs, calls, by_model


def _name(run: Run) -> str:
    return str(run.input.get("name")) if isinstance(run.input, dict) else run.id


def ai_results_table(runs: list[Run], calls: dict[str, list[AICall]]) -> Table:
    table = Table(title="runs", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("doc", "status", "took", "calls", "tokens", "cost", "budget"):
        table.add_column(column, no_wrap=True)
    table.add_column("summary / error", overflow="fold")
    for run in runs:
        output = run.output if isinstance(run.output, dict) else {}
        said = f"[{output.get('topic')}] {output.get('summary')}" if output else run.error
        table.add_row(
            _name(run),
            status_text(run.status),
            fmt_duration(elapsed(run.started_at, run.completed_at)),
            str(len(calls.get(run.id, []))),
            str(run.total_tokens),
            fmt_cost(run.total_cost),
            fmt_cost(run.max_cost) if run.max_cost is not None else "-",
            truncate(said, 70),
        )
    return table


def show(
    out: Console, runs: list[Run], calls: dict[str, list[AICall]], by_model: list[AICostRow]
) -> bool:
    """Print what happened; whether it is what the demo expects."""
    out.print(ai_results_table(runs, calls))
    retried = next(
        (run for run in runs if any(c.failed_attempt for c in calls.get(run.id, []))), None
    )
    if retried is not None:
        table = ai_calls_table(calls[retried.id])
        table.title = f"AI calls of {_name(retried)} (its first request was rate limited)"
        out.print(table)
    out.print(costs_table(by_model, "model"))
    documents = [run for run in runs if _name(run) != "budgeted"]
    stopped = [run for run in runs if _name(run) == "budgeted"]
    completed = all(run.status is RunStatus.COMPLETED for run in documents)
    budget_stop = all(
        run.status is RunStatus.FAILED and "BudgetExceededError" in (run.error or "")
        for run in stopped
    )
    total = sum((run.total_cost for run in runs), Decimal(0))
    verdict = (
        "was stopped by its max_cost before its second call" if budget_stop else "was NOT stopped"
    )
    done = sum(1 for r in documents if r.status is RunStatus.COMPLETED)
    out.print(
        f"{done}/{len(documents)} documents completed; the budgeted run {verdict}; "
        f"{sum(len(c) for c in calls.values())} AI calls cost {fmt_cost(total)} in all"
    )
    return completed and budget_stop and bool(stopped)
