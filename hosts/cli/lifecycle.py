"""``treadle pause``, ``treadle resume``, ``treadle terminate`` and ``treadle purge``:
steer a live run and delete old ones from the shell, through ``Engine.pause``,
``Engine.resume``, ``Engine.terminate`` and ``Engine.purge`` (docs/lifecycle.md)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

import typer

from treadle.hosts.cli.common import AppOption, DbOption, fail, open_engine, run_async, state
from treadle.hosts.cli.runs import parse_statuses
from treadle.kernel import commands as c

RunArgument = Annotated[str, typer.Argument(help="The run.")]
ReasonOption = Annotated[str | None, typer.Option(help="Recorded on the run's event.")]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": "seconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str, option: str) -> timedelta:
    """An age like ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (a bare number: seconds)."""
    found = _AGE.match(text.strip().lower())
    if found is None:
        fail(f"{option}: {text!r} is not an age like 30d, 12h, 90m, 45s or 2w")
    amount, unit = found.groups()
    try:
        return timedelta(**{_UNITS[unit]: float(amount)})
    except OverflowError:
        fail(f"{option}: {text!r} is too long")


def _steer(
    ctx: typer.Context,
    action: Literal["pause", "resume", "terminate"],
    run_id: str,
    reason: str | None,
    db: str | None,
    app: str | None,
    *,
    done: str,
    noop: str,
) -> None:
    """Call ``engine.<action>(run_id, reason=)`` and say ``done`` when it changed the run,
    ``noop`` when the run was already so (the commands differ only in these)."""
    cli = state(ctx, db=db, app=app)

    async def go() -> bool:
        async with open_engine(cli) as engine:
            steer = getattr(engine, action)
            return bool(await steer(run_id, reason=reason))

    typer.echo(done if run_async(go, db=cli.db) else noop)


def pause(
    ctx: typer.Context,
    run_id: RunArgument,
    reason: ReasonOption = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Pause a run: no new stage or step starts until `treadle resume` (the one in flight
    finishes). A run that has ended cannot be paused."""
    _steer(
        ctx, "pause", run_id, reason, db, app,
        done=f"paused {run_id}", noop=f"{run_id} was paused already",
    )  # fmt: skip


def resume(
    ctx: typer.Context,
    run_id: RunArgument,
    reason: ReasonOption = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Resume a paused run from where it stopped."""
    _steer(
        ctx, "resume", run_id, reason, db, app,
        done=f"resumed {run_id}", noop=f"{run_id} was not paused; nothing to resume",
    )  # fmt: skip


def terminate(
    ctx: typer.Context,
    run_id: RunArgument,
    reason: ReasonOption = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """End a run at once (CANCELLED) without running its compensations, unlike cancel."""
    _steer(
        ctx, "terminate", run_id, reason, db, app,
        done=f"terminated {run_id}", noop=f"{run_id} had already finished; nothing to terminate",
    )  # fmt: skip


def purge(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="Runs that ended longer ago than this age (30d, 12h, ...). Default: each "
            "workflow's retention (runs of workflows without one are kept).",
        ),
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option(help="Only runs in this status (COMPLETED, FAILED, CANCELLED); repeatable."),
    ] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be purged; delete nothing.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, max=c.MAX_PURGE_BATCH, help="Runs deleted per transaction.")
    ] = 100,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Delete terminal runs (and their stages, journal, events, logs, annotations and
    blobs) that ended before a cutoff. Runs that have not ended are never purged."""
    cli = state(ctx, db=db, app=app)

    async def go() -> c.RunPurgeResult:
        # Parsed in here: a bad option is one error line (run_async), like any other.
        age = parse_age(older_than, "--older-than") if older_than is not None else None
        statuses = parse_statuses(status)
        live = [s.value for s in statuses or () if not s.terminal]
        if live:
            fail(f"--status: only ended runs (COMPLETED, FAILED, CANCELLED) are purged, not {live}")
        async with open_engine(cli) as engine:
            return await engine.purge(
                age, status=statuses, workflow_id=workflow, dry_run=dry_run, batch_size=batch_size
            )

    result = run_async(go, db=cli.db)
    if dry_run:
        more = " (and more)" if result.more else ""
        typer.echo(f"would purge {result.purged} run(s){more}")
        for run_id in result.workflow_run_ids:
            typer.echo(run_id)
    else:
        typer.echo(f"purged {result.purged} run(s), {result.blobs_deleted} blob(s)")


def register(app: typer.Typer) -> None:
    for fn in (pause, resume, terminate, purge):
        app.command()(fn)
