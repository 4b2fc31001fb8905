"""``treadle runs list`` and ``treadle runs show``: find runs and look inside one."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from treadle.hosts.cli.common import console, echo_json, fail, open_engine, run_async, state
from treadle.kernel.model import Run

runs_app = typer.Typer(help="List runs and show one run's stage timeline.", no_args_is_help=True)

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str | None, option: str, now: datetime | None = None) -> datetime | None:
    """An ISO 8601 time (naive means UTC) or an age like ``30m``, ``2h``, ``7d`` (ago), in
    UTC; one that falls outside the years 1 to 9999 fails naming ``option``."""
    if text is None:
        return None
    relative = _RELATIVE.match(text.strip().lower())
    try:
        if relative:
            amount, unit = relative.groups()
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: float(amount)})
        try:
            value = datetime.fromisoformat(text.strip())
        except ValueError:
            fail(f"{option}: {text!r} is neither an ISO 8601 time nor an age like 30m, 2h, 7d")
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except OverflowError:
        fail(f"{option}: {text!r} is out of range (times run from year 1 to 9999, in UTC)")


@runs_app.command("list")
def list_runs(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="PENDING, RUNNING, SUSPENDED, COMPLETED, FAILED, CANCELLED.")
    ] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow id.")] = None,
    created_after: Annotated[
        str | None, typer.Option(help="Created at or after: ISO time or age (2h, 7d).")
    ] = None,
    created_before: Annotated[
        str | None, typer.Option(help="Created before: ISO time or age (2h, 7d).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many runs.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (paging).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """Runs matching every filter, newest first."""
    cli = state(ctx)

    async def go() -> tuple[list[Run], dict[str, int]]:
        after = parse_when(created_after, "--created-after")
        before = parse_when(created_before, "--created-before")
        async with open_engine(cli) as engine:
            filters: dict[str, Any] = {
                "status": status,
                "workflow_id": workflow,
                "created_after": after,
                "created_before": before,
            }
            runs = await engine.list(limit=limit, offset=offset, **filters)
            counts = await engine.aggregate("status", **filters)
        return runs, counts

    runs, counts = run_async(go, db=cli.db)
    if as_json:
        echo_json([run.model_dump(mode="json", exclude={"stages"}) for run in runs])
        return
    from treadle.hosts.cli.render import runs_table

    table = runs_table(runs)
    total = sum(counts.values())
    table.caption = f"{total} matching: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    console().print(table)


@runs_app.command("show")
def show_run(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to show.")],
    width: Annotated[int, typer.Option(min=10, help="Truncate outputs to this many chars.")] = 60,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run and stages as JSON.")
    ] = False,
) -> None:
    """A run's details: stage timeline, attempts, errors and truncated outputs."""
    cli = state(ctx)

    async def go() -> tuple[Run, list[Any]]:
        async with open_engine(cli) as engine:
            run = await engine.get_run(run_id)
            return run, list(await engine.kernel.events(run_id))

    run, events = run_async(go, db=cli.db)
    if as_json:
        echo_json(run.model_dump(mode="json"))
        return
    from treadle.hosts.cli.render import run_detail

    console().print(run_detail(run, events, width=width))
