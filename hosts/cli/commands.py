"""The operator commands: ``migrate``, ``worker``, ``tick``, ``start``, ``signal``,
``cancel``, ``rerun``, ``fork`` and ``events``.

Each one opens the engine the global options name, does one thing through the
``Engine`` facade (or the shared maintenance tick), and renders the answer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import typer

from treadle.hosts.cli.common import (
    EXIT_FAILURE,
    AppOption,
    DbOption,
    console,
    echo_json,
    fail,
    open_engine,
    parse_json,
    quiet_logger,
    run_async,
    run_guarded,
    seconds_option,
    state,
)
from treadle.kernel.errors import NotSupportedError, StorageError
from treadle.kernel.model import RunStatus
from treadle.runtime.options import MAX_CONCURRENCY, WorkerOptions, default_worker_id

if TYPE_CHECKING:
    from treadle.engine import Engine
    from treadle.runtime.tick import TickReport


# -- migrate --------------------------------------------------------------------------
def migrate(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to.")] = "head",
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Create or upgrade the database schema (run once per deploy on PostgreSQL)."""
    cli = state(ctx, db=db, app=app)

    async def go() -> tuple[str | None, str | None, str]:
        from treadle.runtime.backends import backend_kind

        if backend_kind(cli.db) == "memory":
            fail("memory:// keeps no schema: nothing to migrate")
        from sqlalchemy import exc as sa_exc

        from treadle.adapters import sql
        from treadle.adapters.sql.errors import translate

        def upgrade() -> tuple[str | None, str | None, str]:
            before = sql.current_revision(cli.db)
            sql.migrate(cli.db, revision)
            return before, sql.current_revision(cli.db), sql.head_revision()

        try:
            return await asyncio.to_thread(upgrade)
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, "migrate") from exc
        except StorageError:
            raise
        except Exception as exc:  # Alembic's CommandError: unknown revision, newer database
            raise StorageError(f"migrate failed: {exc}") from exc

    before, after, head = run_async(go, db=cli.db)
    if before == after:
        typer.echo(f"schema already at revision {after} (head {head})")
    else:
        typer.echo(f"schema upgraded from {before or 'empty'} to {after} (head {head})")


# -- worker ---------------------------------------------------------------------------
EXIT_BAD_CONFIG = 2
"""``treadle worker``'s code for a missing or bad app, as ``hosts.worker`` returns it."""


def _help(option: str) -> str:
    """A worker option's help text: its ``WorkerOptions`` description."""
    return WorkerOptions.model_fields[option].description or ""


def _default(option: str) -> Any:
    """A worker option's default, as ``WorkerOptions`` states it."""
    return WorkerOptions.model_fields[option].default


def worker(
    ctx: typer.Context,
    worker_id: Annotated[str | None, typer.Option(help=_help("worker_id"))] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=MAX_CONCURRENCY, help=_help("concurrency"))
    ] = _default("concurrency"),
    drain_timeout: Annotated[float, seconds_option(_help("drain_timeout"))] = _default(
        "drain_timeout"
    ),
    orchestration_interval: Annotated[
        float, seconds_option(_help("orchestration_interval"), at_least=0.01)
    ] = _default("orchestration_interval"),
    job_poll_interval: Annotated[
        float, seconds_option(_help("job_poll_interval"), at_least=0.01)
    ] = _default("job_poll_interval"),
    stale_lease_threshold: Annotated[
        float, seconds_option(_help("stale_lease_threshold"), at_least=0.01)
    ] = _default("stale_lease_threshold"),
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            "-q",
            help="A named queue to serve (repeat for several); default: the 'default' queue.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus metrics at http://0.0.0.0:PORT/metrics (the otel extra).",
        ),
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve /healthz (loops alive, recent tick) and /readyz (database, schema).",
        ),
    ] = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Run a long-lived worker until SIGTERM/SIGINT (graceful drain)."""
    cli = state(ctx, db=db, app=app)
    if cli.app is None:
        typer.echo("error: the worker needs the app: pass --app module:attr", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG)
    try:
        from treadle.hosts.worker import main as worker_main
    except ImportError as exc:
        typer.echo(f"error: the worker host is not available: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    options: dict[str, Any] = {
        "worker_id": worker_id,
        "concurrency": concurrency,
        "drain_timeout": drain_timeout,
        "orchestration_interval": orchestration_interval,
        "job_poll_interval": job_poll_interval,
        "stale_lease_threshold": stale_lease_threshold,
    }
    if queue:
        options["queues"] = queue
    code = run_guarded(
        lambda: worker_main(
            app=cli.app,
            db=cli.db,
            options=options,
            metrics_port=metrics_port,
            health_port=health_port,
        ),
        db=cli.db,
    )
    raise typer.Exit(code)


# -- tick -----------------------------------------------------------------------------
def tick_failures(report: TickReport) -> dict[str, str]:
    """Steps that failed: those that raised, and an outbox flush that could not publish
    (the sink is broken even though the step itself completed)."""
    failures = dict(report.errors)
    flush = report.result("flush_outbox")
    if "flush_outbox" not in failures and flush.get("failed"):
        failures["flush_outbox"] = (
            f"{flush['failed']} event(s) could not be published "
            f"({flush.get('dead_lettered', 0)} dead-lettered)"
        )
    return failures


def tick_json(report: TickReport, failures: dict[str, str]) -> dict[str, Any]:
    return {
        "ok": not failures,
        "worker_id": report.worker_id,
        "started_at": report.started_at.isoformat(),
        "failed_steps": sorted(failures),
        "steps": {
            name: {
                "ok": name not in failures,
                "result": step.result,
                "error": failures.get(name),
                "duration": round(step.duration, 6),
            }
            for name, step in report.steps.items()
        },
    }


def _summary(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    parts = []
    for key, value in result.items():
        if isinstance(value, list):
            value = len(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def tick(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the step results as JSON.")
    ] = False,
    worker_id: Annotated[str | None, typer.Option(help="Worker id that claims runs.")] = None,
    stale_lease_threshold: Annotated[
        float, seconds_option(_help("stale_lease_threshold"), at_least=0.01)
    ] = _default("stale_lease_threshold"),
    stuck_threshold: Annotated[
        float, seconds_option(_help("stuck_threshold"), at_least=0.01)
    ] = _default("stuck_threshold"),
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Run one maintenance tick (for cron); exit 1 naming any failed step."""
    cli = state(ctx, db=db, app=app)

    async def go() -> TickReport:
        from treadle.runtime.tick import maintenance_tick

        async with open_engine(cli) as engine:
            return await maintenance_tick(
                engine.kernel,
                worker_id=worker_id or f"tick:{default_worker_id()}",
                stale_threshold=stale_lease_threshold,
                stuck_threshold=stuck_threshold,
            )

    report = run_async(go, db=cli.db)
    failures = tick_failures(report)
    if as_json:
        echo_json(tick_json(report, failures), sort_keys=False)  # steps in STEP_ORDER
    else:
        from rich.table import Table
        from rich.text import Text

        table = Table(title="maintenance tick", title_justify="left")
        for column in ("step", "ok", "result", "took"):
            table.add_column(column)
        for name, step in report.steps.items():
            ok = Text("FAILED", style="red") if name in failures else Text("ok", style="green")
            table.add_row(name, ok, _summary(step.result), f"{step.duration * 1000:.0f}ms")
        console().print(table)
    for name, message in failures.items():
        typer.echo(f"tick failed: step {name}: {message}", err=True)
    if failures:
        raise typer.Exit(EXIT_FAILURE)


# -- start ----------------------------------------------------------------------------
def start(
    ctx: typer.Context,
    workflow_id: Annotated[str, typer.Argument(help="The workflow to run.")],
    input_json: Annotated[
        str | None, typer.Argument(metavar="[INPUT]", help="Run input as JSON, or @file.json.")
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="Per-stage config as JSON ({stage_id: {...}}), or @file.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Starting again with this key returns the same run.")
    ] = None,
    priority: Annotated[int, typer.Option(min=0, max=100, help="Higher runs first.")] = 5,
    concurrency_key: Annotated[
        str | None,
        typer.Option(help="Share the workflow's per-key concurrency and rate limits."),
    ] = None,
    max_cost: Annotated[
        str | None,
        typer.Option(help="AI budget of the run (e.g. 0.50): past it the run fails."),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Show live stage progress until the run ends.")
    ] = False,
    timeout: Annotated[
        float | None, seconds_option("With --wait: give up after this many seconds.")
    ] = None,
    local_worker: Annotated[
        bool, typer.Option(help="With --wait: execute the run in this process.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Start a run; prints its id (with --wait: its progress and output)."""
    cli = state(ctx, db=db, app=app)

    async def go() -> tuple[str, Any]:
        payload = parse_json(input_json, "INPUT")
        stage_config = parse_json(config, "--config")
        if stage_config is not None and not isinstance(stage_config, dict):
            fail("--config must be a JSON object mapping stage id to config")
        async with open_engine(cli, need_app=True, create=True) as engine:
            handle = await engine.start(
                workflow_id,
                payload,
                idempotency_key=idempotency_key,
                priority=priority,
                config=stage_config,
                concurrency_key=concurrency_key,
                max_cost=max_cost,
            )
            if not wait:
                return handle.run_id, None
            from treadle.hosts.cli.progress import watch_runs

            out = console(stderr=as_json)
            if not local_worker:
                return handle.run_id, await watch_runs(
                    engine, [handle.run_id], out, max_wait=timeout
                )
            async with engine.worker(
                orchestration_interval=0.5, job_poll_interval=0.1, logger=quiet_logger()
            ):
                return handle.run_id, await watch_runs(
                    engine, [handle.run_id], out, max_wait=timeout
                )

    run_id, runs = run_async(go, db=cli.db)
    if not wait:
        if as_json:
            echo_json({"run_id": run_id})
        else:
            typer.echo(run_id)
        return
    run = runs[0]
    if as_json:
        echo_json(run.model_dump(mode="json", exclude={"stages"}))
    else:
        typer.echo(f"run {run.id} {run.status.value}")
        if run.status is RunStatus.COMPLETED:
            typer.echo(f"output: {_compact(run.output)}")
        elif run.error:
            typer.echo(f"error: {run.error}", err=True)
    if run.status is not RunStatus.COMPLETED:
        raise typer.Exit(EXIT_FAILURE)


def _compact(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


# -- signal / cancel / rerun ------------------------------------------------------------
def signal(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to signal.")],
    name: Annotated[str, typer.Argument(help="Signal name.")],
    payload_json: Annotated[
        str | None, typer.Argument(metavar="[PAYLOAD]", help="Payload as JSON, or @file.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Sending again with this key is a no-op.")
    ] = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Deliver a signal to a run waiting in ctx.wait_for_signal (code workflows)."""
    cli = state(ctx, db=db, app=app)

    async def go() -> bool:
        payload = parse_json(payload_json, "PAYLOAD")
        async with open_engine(cli) as engine:
            return await engine.signal(run_id, name, payload, idempotency_key=idempotency_key)

    delivered = run_async(go, db=cli.db)
    typer.echo(f"signal {name!r} {'delivered to' if delivered else 'not delivered to'} {run_id}")
    if not delivered:
        raise typer.Exit(EXIT_FAILURE)


def cancel(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to cancel.")],
    reason: Annotated[str | None, typer.Option(help="Recorded on the run.")] = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Cancel a run and all its unfinished stages."""
    cli = state(ctx, db=db, app=app)

    async def go() -> bool:
        async with open_engine(cli) as engine:
            return await engine.cancel(run_id, reason=reason)

    if run_async(go, db=cli.db):
        typer.echo(f"cancelled {run_id}")
    else:
        typer.echo(f"{run_id} had already finished; nothing to cancel")


def rerun(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="A finished run.")],
    stage_id: Annotated[str, typer.Argument(help="Reset this stage and every later one.")],
    config: Annotated[
        str | None,
        typer.Option(
            help="New config of reset stages as JSON ({stage_id: {...}}), or @file; "
            "stages it does not name keep theirs."
        ),
    ] = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Re-run a finished run from a stage (its outputs and later ones are discarded),
    optionally with a corrected --config. Code workflows: use `treadle fork`."""
    cli = state(ctx, db=db, app=app)

    async def go() -> list[str]:
        stage_config = parse_json(config, "--config")
        if stage_config is not None and not isinstance(stage_config, dict):
            fail("--config must be a JSON object mapping stage id to config")
        async with open_engine(cli, need_app=True) as engine:
            try:
                result = await engine.rerun_from(run_id, stage_id, config=stage_config)
            except NotSupportedError:
                await _suggest_fork(engine, run_id)
                raise
            return list(result.deleted_stages)

    reset = run_async(go, db=cli.db)
    typer.echo(f"rerunning {run_id} from {stage_id}: reset {', '.join(reset) or 'nothing'}")


async def _suggest_fork(engine: Engine, run_id: str) -> None:
    """``rerun`` of a code workflow: say what to run instead, with the run's step names."""
    from treadle.hosts.cli.runs import is_code_run

    run = await engine.get_run(run_id)
    if not is_code_run(run):
        return
    steps = list(dict.fromkeys(e.name for e in await engine.journal(run_id) if e.kind == "step"))
    known = f" (its steps: {', '.join(steps)})" if steps else ""
    fail(
        f"run {run_id} is a code workflow ({run.workflow_id}): rerun resets pipeline stages; "
        f"use `treadle fork {run_id} --from-step NAME` to run a step and everything after "
        f"it again in a new run{known}"
    )


def fork(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The code-workflow run to fork.")],
    from_step: Annotated[
        str,
        typer.Option(
            "--from-step",
            metavar="NAME",
            help="Run this step (NAME, or NAME#N for its N-th occurrence) and all later "
            "calls afresh; earlier journal entries are reused.",
        ),
    ],
    idempotency_key: Annotated[
        str | None, typer.Option(help="Forking again with this key returns the same run.")
    ] = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Start a new run of a code workflow that reuses a run's journal up to a step;
    prints the new run's id (the source run is left as it is)."""
    cli = state(ctx, db=db, app=app)

    async def go() -> str:
        async with open_engine(cli, need_app=True) as engine:
            handle = await engine.fork(run_id, from_step, idempotency_key=idempotency_key)
            return handle.run_id

    typer.echo(run_async(go, db=cli.db))


# -- events ---------------------------------------------------------------------------
def events(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run whose events to show.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep tailing until the run ends.")
    ] = False,
    after: Annotated[int, typer.Option(min=0, help="Only events after this sequence.")] = 0,
    poll_interval: Annotated[float, seconds_option("Seconds between reads.", at_least=0.01)] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Print a run's events in order (--follow tails them live)."""
    cli = state(ctx, db=db, app=app)

    async def go() -> None:
        import json

        from treadle.hosts.cli.render import event_line

        out = console()
        async with open_engine(cli) as engine:
            async for event in engine.events(
                run_id, follow=follow, poll_interval=poll_interval, after_sequence=after
            ):
                if as_json:
                    typer.echo(json.dumps(event.model_dump(mode="json"), sort_keys=True))
                else:
                    out.print(event_line(event))

    run_async(go, db=cli.db)


def register(app: typer.Typer) -> None:
    for fn in (migrate, worker, tick, start, signal, cancel, rerun, fork, events):
        app.command()(fn)
