"""The CLI's AI views: ``treadle demo --ai`` (calls and costs in the terminal, a budget
stop), ``treadle costs`` by model, workflow, day and run, the cost and token columns of
``runs list``, the AI calls of ``runs show`` (never a prompt), and ``start --max-cost``."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

from typer.testing import CliRunner

from treadle.hosts.cli import build_app
from treadle.tests.cli.helpers import Invoke

APP = "treadle.examples.ai_pipeline:pipeline"


def _run_documents(db_url: str) -> list[str]:
    """The AI example's three documents on ``db_url``, run to completion in process."""
    from treadle import Engine
    from treadle.examples import ai_pipeline as example

    example.reset_fake_model()

    async def go() -> list[str]:
        engine = await Engine.open(db_url, workflows=[example.pipeline])
        async with engine, engine.worker(orchestration_interval=0.05, job_poll_interval=0.02):
            handles = [
                await engine.start("ai-documents", {"name": name, "text": text})
                for name, text in example.DOCUMENTS.items()
            ]
            for handle in handles:
                await handle.result(timeout=20)
        return [h.run_id for h in handles]

    return asyncio.run(go())


def test_demo_ai_shows_calls_costs_and_a_budget_stop(tmp_path: Path) -> None:
    """``treadle demo --ai`` runs the AI pipeline on SQLite and prints every run's cost,
    the calls of the rate-limited run, the costs by model and the budget stop; exit 0."""
    db = tmp_path / "ai-demo.db"
    result = CliRunner().invoke(build_app(), ["demo", "--ai", "--file", str(db)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "3/3 documents completed" in out
    assert "stopped by its max_cost before its second call" in out
    assert "AI calls of memo" in out
    assert "AIRateLimitedError" in out
    assert "AI costs by model" in out
    assert "gpt-4o-mini" in out
    assert "$0.0000" in out
    assert "Summarise in one sentence" not in out  # prompts are not shown


def test_costs_by_model_workflow_day_and_run(db_url: str, invoke: Invoke) -> None:
    """``treadle costs`` groups the recorded calls; --json gives the rows, exact sums."""
    run_ids = _run_documents(db_url)
    table = invoke("costs", app=None)
    assert table.exit_code == 0, table.output
    assert "AI costs by model, since 7d" in table.stdout
    assert "gpt-4o-mini" in table.stdout
    rows = {}
    for by in ("model", "workflow", "day", "run"):
        result = invoke("costs", "--by", by, "--json", app=None)
        assert result.exit_code == 0, result.output
        rows[by] = json.loads(result.stdout)
    [model] = rows["model"]
    assert (model["key"], model["calls"], model["failed_calls"]) == ("gpt-4o-mini", 7, 1)
    assert [r["key"] for r in rows["workflow"]] == ["ai-documents"]
    assert len(rows["day"]) == 1
    assert sorted(r["key"] for r in rows["run"]) == sorted(run_ids)
    assert sum(Decimal(r["total_cost"]) for r in rows["run"]) == Decimal(model["total_cost"])
    old = invoke("costs", "--until", "30d", "--json", app=None)
    assert json.loads(old.stdout) == []
    bad = invoke("costs", "--by", "colour", app=None)
    assert bad.exit_code != 0


def test_runs_list_and_show_carry_costs(db_url: str, invoke: Invoke) -> None:
    """``runs list`` shows each run's AI cost and tokens; ``runs show`` its AI line and
    calls (the failed attempt's error, never the prompt); --json includes the calls."""
    memo, *_ = _run_documents(db_url)
    listed = invoke("runs", "list", app=None)
    assert listed.exit_code == 0, listed.output
    assert "AI cost" in listed.stdout
    assert "$0.0000" in listed.stdout
    shown = invoke("runs", "show", memo, app=None)
    assert shown.exit_code == 0, shown.output
    assert "AI calls" in shown.stdout
    assert "AIRateLimitedError" in shown.stdout
    assert "tokens" in shown.stdout
    assert "Summarise in one sentence" not in shown.stdout
    data = json.loads(invoke("runs", "show", memo, "--json", app=None).stdout)
    assert [c["failed_attempt"] for c in data["ai_calls"]] == [True, False, False]
    spent = sum(Decimal(c["cost"] or 0) for c in data["ai_calls"])
    assert Decimal(data["total_cost"]) == spent


def test_start_takes_a_budget(db_url: str, invoke: Invoke) -> None:
    """``start --max-cost`` stores the run's budget; a bad amount is one error line."""
    result = invoke(
        "start", "ai-documents", '{"name": "n", "text": "t"}', "--max-cost", "0.25", app=APP
    )
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    data = json.loads(invoke("runs", "show", run_id, "--json", app=None).stdout)
    assert data["max_cost"] == "0.25"
    bad = invoke("start", "ai-documents", '{"name": "n", "text": "t"}', "--max-cost", "-1", app=APP)
    assert bad.exit_code != 0
    assert "max_cost" in bad.stderr
