"""``treadle schedules``: list, create, pause, resume, trigger and delete cron schedules
through ``engine.schedules`` (docs/schedules.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from treadle.hosts.cli.common import (
    AppOption,
    DbOption,
    echo_json,
    open_engine,
    parse_json,
    run_async,
    state,
)

if TYPE_CHECKING:
    from treadle.kernel.schedules import Schedule

schedules_app = typer.Typer(help="Manage cron schedules.", no_args_is_help=True)

IdArgument = Annotated[str, typer.Argument(help="The schedule's id.")]


def _row(schedule: Schedule) -> dict[str, Any]:
    return {
        "id": schedule.id,
        "workflow_id": schedule.workflow_id,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "paused": schedule.paused,
        "next_fire_at": schedule.next_fire_at.isoformat() if schedule.next_fire_at else None,
        "last_fire_at": schedule.last_fire_at.isoformat() if schedule.last_fire_at else None,
        "last_run_id": schedule.last_run_id,
        "catchup": schedule.catchup,
        "overlap": schedule.overlap,
    }


@schedules_app.command("list")
def list_schedules(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """List schedules: id, workflow, expression, timezone, state, next and last fire."""
    cli = state(ctx, db=db, app=app)

    async def go() -> list[Schedule]:
        async with open_engine(cli) as engine:
            return await engine.schedules.list()

    found = run_async(go, db=cli.db)
    if as_json:
        echo_json([_row(s) for s in found], sort_keys=False)
        return
    if not found:
        typer.echo("no schedules")
        return
    for s in found:
        when = "paused" if s.paused else f"next {_row(s)['next_fire_at']}"
        last = f", last {_row(s)['last_fire_at']} ({s.last_run_id})" if s.last_fire_at else ""
        typer.echo(f"{s.id}  {s.workflow_id}  '{s.cron}' {s.timezone}  {when}{last}")


def _change(ctx: typer.Context, db: str | None, app: str | None, verb: str, sid: str) -> None:
    cli = state(ctx, db=db, app=app)

    async def go() -> Schedule:
        async with open_engine(cli) as engine:
            method = getattr(engine.schedules, verb)
            result: Schedule = await method(sid)
            return result

    echo_json(_row(run_async(go, db=cli.db)), sort_keys=False)


@schedules_app.command()
def pause(
    ctx: typer.Context, schedule_id: IdArgument, db: DbOption = None, app: AppOption = None
) -> None:
    """Stop firing the schedule until resumed (a trigger still starts a run)."""
    _change(ctx, db, app, "pause", schedule_id)


@schedules_app.command()
def resume(
    ctx: typer.Context, schedule_id: IdArgument, db: DbOption = None, app: AppOption = None
) -> None:
    """Fire again from the next fire time after now (none missed while paused)."""
    _change(ctx, db, app, "resume", schedule_id)


@schedules_app.command()
def trigger(
    ctx: typer.Context, schedule_id: IdArgument, db: DbOption = None, app: AppOption = None
) -> None:
    """Start a run of the schedule now (needs --app: the run's workflow); prints its id."""
    cli = state(ctx, db=db, app=app)

    async def go() -> str | None:
        async with open_engine(cli, need_app=True) as engine:
            return await engine.schedules.trigger(schedule_id)

    run_id = run_async(go, db=cli.db)
    typer.echo(run_id if run_id is not None else "skipped: the previous run is still going")


@schedules_app.command()
def delete(
    ctx: typer.Context, schedule_id: IdArgument, db: DbOption = None, app: AppOption = None
) -> None:
    """Delete the schedule (its runs stay)."""
    cli = state(ctx, db=db, app=app)

    async def go() -> bool:
        async with open_engine(cli) as engine:
            return await engine.schedules.delete(schedule_id)

    typer.echo("deleted" if run_async(go, db=cli.db) else f"no schedule {schedule_id!r}")


@schedules_app.command()
def create(
    ctx: typer.Context,
    schedule_id: IdArgument,
    workflow_id: Annotated[str, typer.Argument(help="The workflow each fire starts.")],
    cron: Annotated[str, typer.Argument(help="Cron expression, e.g. '*/5 * * * *'.")],
    input_json: Annotated[
        str | None, typer.Option("--input", help="Run input as JSON, or @file.")
    ] = None,
    timezone: Annotated[str, typer.Option("--timezone", help="IANA timezone.")] = "UTC",
    catchup: Annotated[str, typer.Option(help="skip, latest or all.")] = "latest",
    overlap: Annotated[str, typer.Option(help="allow, skip or cancel_previous.")] = "allow",
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Create a schedule (needs --app: its input is checked against the workflow)."""
    cli = state(ctx, db=db, app=app)
    payload = parse_json(input_json, "--input") if input_json is not None else None

    async def go() -> Schedule:
        async with open_engine(cli, need_app=True) as engine:
            return await engine.schedules.create(
                schedule_id,
                workflow_id,
                cron=cron,
                input=payload,
                timezone=timezone,
                catchup=catchup,  # type: ignore[arg-type]  # checked by the command
                overlap=overlap,  # type: ignore[arg-type]
            )

    echo_json(_row(run_async(go, db=cli.db)), sort_keys=False)
