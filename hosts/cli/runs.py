"""``treadle runs list`` and ``treadle runs show``: find runs and look inside one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from treadle.hosts.cli.common import (
    AppOption,
    DbOption,
    console,
    echo_json,
    fail,
    open_engine,
    run_async,
    state,
)
from treadle.kernel.model import JsonValue, Run, RunStatus
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID

if TYPE_CHECKING:
    from treadle.engine import Engine
    from treadle.kernel.ai import AICall
    from treadle.kernel.workflows.model import JournalEntry, Timer

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


def parse_statuses(values: list[str] | None) -> list[RunStatus] | None:
    """``--status`` values, each one status or several separated by commas, any case."""
    if not values:
        return None
    found: list[RunStatus] = []
    for value in values:
        for name in value.split(","):
            try:
                status = RunStatus(name.strip().upper())
            except ValueError:
                allowed = ", ".join(s.value for s in RunStatus)
                fail(f"--status: {name.strip()!r} is not a run status (use {allowed})")
            if status not in found:
                found.append(status)
    return found


def _text(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # NaN, Infinity: taken as text


def parse_attributes(values: list[str] | None) -> dict[str, JsonValue] | None:
    """``--attr key=value`` pairs. The value is read as JSON when it is JSON (``n=3``,
    ``vip=true``, ``tier="3"``), as plain text otherwise (``tier=gold``), so a search
    attribute stored as a number or boolean is matched by the same literal."""
    if not values:
        return None
    attributes: dict[str, JsonValue] = {}
    for pair in values:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--attr: {pair!r} is not key=value")
        try:
            value: JsonValue = json.loads(raw, parse_constant=_text)
        except ValueError:
            value = raw
        attributes[key.strip()] = value
    return attributes


@runs_app.command("list")
def list_runs(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option(
            help="PENDING, RUNNING, SUSPENDED, COMPLETED, FAILED, CANCELLED; repeat the "
            "option or separate with commas for any of several.",
        ),
    ] = None,
    attr: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE",
            help="Search attribute equals VALUE (JSON, or text); repeat for several.",
        ),
    ] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow id.")] = None,
    created_after: Annotated[
        str | None, typer.Option(help="Created at or after: ISO time or age (2h, 7d).")
    ] = None,
    created_before: Annotated[
        str | None, typer.Option(help="Created before: ISO time or age (2h, 7d).")
    ] = None,
    paused: Annotated[
        bool, typer.Option("--paused", help="Only runs held by `treadle pause`.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many runs.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (paging).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Runs matching every filter, newest first."""
    cli = state(ctx, db=db, app=app)

    async def go() -> tuple[list[Run], dict[str, int]]:
        after = parse_when(created_after, "--created-after")
        before = parse_when(created_before, "--created-before")
        filters: dict[str, Any] = {
            "status": parse_statuses(status),
            "workflow_id": workflow,
            "created_after": after,
            "created_before": before,
            "attributes": parse_attributes(attr),
        }
        async with open_engine(cli) as engine:
            runs = await engine.list(
                limit=limit, offset=offset, paused=True if paused else None, **filters
            )
            counts = await engine.aggregate("status", **filters)
        return runs, counts

    runs, counts = run_async(go, db=cli.db)
    if as_json:
        echo_json([run.model_dump(mode="json", exclude={"stages"}) for run in runs])
        return
    from treadle.hosts.cli.render import runs_table

    table = runs_table(runs)
    if not paused:  # the counts do not know the paused filter
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
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """A run's details: stage timeline (a code workflow's journal steps and timers),
    attempts, errors and truncated outputs."""
    cli = state(ctx, db=db, app=app)

    async def go() -> Shown:
        async with open_engine(cli) as engine:
            return await read_run(engine, run_id)

    shown = run_async(go, db=cli.db)
    if as_json:
        data = shown.run.model_dump(mode="json")
        data["ai_calls"] = [call.model_dump(mode="json") for call in shown.ai_calls]
        data["continued_from"] = shown.run.continued_from
        data["continued_as"] = shown.run.continued_as
        if shown.code:
            data["journal"] = [e.model_dump(mode="json") for e in shown.journal]
            data["timers"] = [t.model_dump(mode="json") for t in shown.timers]
        echo_json(data)
        return
    from treadle.hosts.cli.render import run_detail

    console().print(
        run_detail(
            shown.run,
            shown.events,
            width=width,
            journal=shown.journal if shown.code else None,
            timers=shown.timers,
            ai_calls=shown.ai_calls,
        )
    )


@dataclass
class Shown:
    """What ``runs show`` reads of one run."""

    run: Run
    events: list[Any]
    code: bool = False
    """A code workflow run: its body is the one ``workflow`` stage, its steps the journal."""
    journal: list[JournalEntry] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    ai_calls: list[AICall] = field(default_factory=list)


def is_code_run(run: Run) -> bool:
    """Whether ``run`` is a code workflow's: its only stage is the orchestrating body.
    Read from the stored run, so ``runs show`` needs no ``--app``."""
    return len(run.stages) == 1 and run.stages[0].stage_id == WORKFLOW_STAGE_ID


async def read_run(engine: Engine, run_id: str) -> Shown:
    run = await engine.get_run(run_id)
    shown = Shown(run=run, events=list(await engine.kernel.events(run_id)))
    shown.ai_calls = await engine.ai_calls(run_id)
    if is_code_run(run):
        shown.code = True
        shown.journal = await engine.journal(run_id)
        async with engine.kernel.deps.persistence.transaction() as tx:
            shown.timers = await tx.timers.pending(run_id)
    return shown
