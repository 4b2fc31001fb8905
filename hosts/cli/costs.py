"""``treadle costs``: what AI calls cost, by model, workflow, day or run."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from treadle.hosts.cli.common import (
    AppOption,
    DbOption,
    console,
    echo_json,
    open_engine,
    run_async,
    state,
)
from treadle.hosts.cli.runs import parse_when
from treadle.kernel.ai import AICostRow


def costs(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(help="Calls made at or after: an age (24h, 7d) or an ISO time."),
    ] = "7d",
    until: Annotated[
        str | None, typer.Option(help="Calls made before: an age or an ISO time.")
    ] = None,
    by: Annotated[str, typer.Option(help="Group by model, workflow, day (UTC) or run.")] = "model",
    workflow: Annotated[str | None, typer.Option(help="Only calls of this workflow id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many rows.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """AI calls, tokens and cost per model, workflow, day or run, most expensive first
    (failed attempts included and counted)."""
    cli = state(ctx, db=db, app=app)
    if by not in ("model", "workflow", "day", "run"):
        from treadle.hosts.cli.common import fail

        fail(f"--by: {by!r} is not one of model, workflow, day, run")
    group: Literal["workflow", "model", "day", "run"] = by  # type: ignore[assignment]

    async def go() -> list[AICostRow]:
        start = parse_when(since, "--since")
        end = parse_when(until, "--until")
        async with open_engine(cli) as engine:
            return await engine.ai_costs(
                group, since=start, until=end, workflow_id=workflow, limit=limit
            )

    rows = run_async(go, db=cli.db)
    if as_json:
        echo_json([row.model_dump(mode="json") for row in rows])
        return
    from treadle.hosts.cli.render import costs_table

    table = costs_table(rows, by)
    if since:
        table.title = f"AI costs by {by}, since {since}"
    console().print(table)
