"""``treadle doctor``: is this deployment healthy?

Checks, in order, each ``ok``, ``warn`` or ``FAIL``:

- ``connectivity``: the database answers ``SELECT 1`` (latency shown);
- ``schema``: the schema is at the revision this release ships;
- ``clock skew``: this machine's clock against the database's (leases, retries and
  timers compare times written by different machines, so skew shifts them);
- ``stuck runs``: RUNNING runs with no activity past the stuck threshold;
- ``stale leases``: jobs whose worker stopped heartbeating (SQL only);
- ``pending runs`` / ``overdue polls``: work no worker or tick is picking up;
- ``queues``: named queues whose jobs are due while no live worker serves them
  (workers beat into the registry on every tick; see docs/queues.md);
- ``remote workers``: with ``--app``, queues of the app's remote stages that no live
  remote worker serves (they beat on every lease and heartbeat; docs/remote-workers.md);
- ``dead letters``: outbox events that exhausted their retries (the DLQ).

A check that cannot run because an earlier one failed is ``skip``. Any ``FAIL``
makes the exit code 1, so it can gate a deploy or back a health probe.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from treadle.adapters.urls import redact_url
from treadle.hosts.cli.common import (
    EXIT_FAILURE,
    AppOption,
    CliState,
    DbOption,
    console,
    echo_json,
    error_line,
    load_app,
    run_async,
    seconds_option,
    state,
)
from treadle.kernel.model import QueueInfo, RunFilter, RunStatus

Level = Literal["ok", "warn", "FAIL", "skip"]
_STYLE = {"ok": "green", "warn": "yellow", "FAIL": "bold red", "skip": "dim"}
_SAMPLE = 3
_SCAN_LIMIT = 10_000


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


@dataclass(frozen=True)
class Thresholds:
    max_skew: float
    stuck: float
    stale_lease: float
    pending: float
    overdue: float
    worker_ttl: float = 60.0


def _why(exc: BaseException, db: str) -> str:
    return error_line(exc, db).removeprefix("error: ")


def _sample(ids: list[str]) -> str:
    shown = ", ".join(ids[:_SAMPLE])
    return shown + (f" (+{len(ids) - _SAMPLE} more)" if len(ids) > _SAMPLE else "")


def _count(n: int) -> str:
    return f">= {n}" if n >= _SCAN_LIMIT else str(n)


# -- SQL probes (blocking driver, run in a thread) ------------------------------------
def sql_probe(url: str) -> dict[str, Any]:
    """Latency, database time and schema revision through one blocking connection."""
    import sqlalchemy as sa

    from treadle.adapters.sql import current_revision, head_revision, sync_url

    target = sync_url(url)
    dialect = target.get_backend_name()
    if dialect == "sqlite":
        database = target.database or ""
        if not Path(database).expanduser().is_file():
            raise FileNotFoundError(f"no SQLite database at {database!r} (created on first use)")
    connect_args = {"connect_timeout": 5} if dialect == "postgresql" else {}
    engine = sa.create_engine(target, poolclass=sa.pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            started = time.monotonic()
            conn.execute(sa.text("SELECT 1"))
            latency = time.monotonic() - started
            before = datetime.now(UTC)
            if dialect == "postgresql":
                db_now = conn.execute(sa.text("SELECT now()")).scalar_one()
            else:
                raw = conn.execute(
                    sa.text("SELECT strftime('%Y-%m-%dT%H:%M:%f', 'now')")
                ).scalar_one()
                db_now = datetime.fromisoformat(str(raw)).replace(tzinfo=UTC)
            after = datetime.now(UTC)
    finally:
        engine.dispose()
    local = before + (after - before) / 2
    return {
        "latency": latency,
        "skew": (db_now - local).total_seconds(),
        "round_trip": (after - before).total_seconds(),
        "revision": current_revision(url),
        "head": head_revision(),
    }


def _stale_leases(url: str, threshold: float) -> list[str]:
    import sqlalchemy as sa

    from treadle.adapters.sql import sync_url
    from treadle.adapters.sql.schema import jobs

    cutoff = datetime.now(UTC) - timedelta(seconds=threshold)
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs.c.id)
                .where(jobs.c.status == "LEASED", jobs.c.heartbeat_at < cutoff)
                .limit(_SCAN_LIMIT)
            )
            return [str(row[0]) for row in rows]
    finally:
        engine.dispose()


# -- checks ---------------------------------------------------------------------------
def _skew_check(skew: float, round_trip: float, limit: float) -> Check:
    detail = f"database clock is {abs(skew):.3f}s {'ahead' if skew >= 0 else 'behind'}"
    detail += f" (±{round_trip / 2:.3f}s)"
    if abs(skew) > limit:
        return Check("clock skew", "FAIL", f"{detail}; more than {limit:g}s: run NTP")
    if abs(skew) > limit / 5:
        return Check("clock skew", "warn", detail)
    return Check("clock skew", "ok", detail)


async def _storage_checks(cli: CliState, kind: str, limits: Thresholds) -> list[Check]:
    """Checks that read Treadle's tables through the ports (any backend)."""
    from treadle.engine import Engine

    checks: list[Check] = []
    async with await Engine.open(cli.db) as engine:
        persistence = engine.kernel.deps.persistence
        now = datetime.now(UTC)
        async with persistence.transaction() as tx:
            stuck = await tx.runs.inactive_since(
                RunStatus.RUNNING, now - timedelta(seconds=limits.stuck), _SCAN_LIMIT
            )
            pending = await tx.runs.inactive_since(
                RunStatus.PENDING, now - timedelta(seconds=limits.pending), _SCAN_LIMIT
            )
            overdue = await tx.stages.due_suspended(
                now - timedelta(seconds=limits.overdue), _SCAN_LIMIT
            )
            dead = await tx.outbox.dead_lettered(_SCAN_LIMIT)
            paused = await tx.runs.query(RunFilter(paused=True, limit=_SCAN_LIMIT))
            late_schedules = await tx.schedules.due(
                now - timedelta(seconds=limits.overdue), _SCAN_LIMIT
            )
            paused_schedules = await tx.schedules.list(paused=True, limit=_SCAN_LIMIT)
        queues = await engine.queues(live_within=limits.worker_ttl)
    if stuck:
        ids = [r.id for r in stuck]
        checks.append(
            Check(
                "stuck runs",
                "FAIL",
                f"{_count(len(ids))} RUNNING run(s) idle over {limits.stuck:g}s: {_sample(ids)}",
            )
        )
    else:
        checks.append(Check("stuck runs", "ok", f"none idle over {limits.stuck:g}s"))
    if kind != "memory":
        leased = await asyncio.to_thread(_stale_leases, cli.db, limits.stale_lease)
        checks.append(
            Check(
                "stale leases",
                "warn" if leased else "ok",
                f"{_count(len(leased))} job(s) without heartbeat over {limits.stale_lease:g}s"
                + (f": {_sample(leased)} (a tick releases them)" if leased else ""),
            )
        )
    checks.append(
        Check(
            "pending runs",
            "warn" if pending else "ok",
            f"{_count(len(pending))} waiting over {limits.pending:g}s"
            + (": is a worker running with this app?" if pending else ""),
        )
    )
    checks.append(
        Check(
            "overdue polls",
            "warn" if overdue else "ok",
            f"{_count(len(overdue))} suspended stage(s) overdue by {limits.overdue:g}s"
            + (": is a worker or `treadle tick` running?" if overdue else ""),
        )
    )
    remote = _remote_queues(cli)
    checks.append(_queues_check(queues, limits.worker_ttl, remote or {}))
    checks.append(_remote_check(remote, queues, limits.worker_ttl))
    late_ids = [s.id for s in late_schedules]
    paused_ids = [s.id for s in paused_schedules]
    checks.append(
        Check(
            "schedules",
            "warn" if late_ids else "ok",
            (
                f"{_count(len(late_ids))} overdue by {limits.overdue:g}s: {_sample(late_ids)}: "
                "is a worker or `treadle tick` running?"
                if late_ids
                else "none overdue"
            )
            + (f"; {_count(len(paused_ids))} paused: {_sample(paused_ids)}" if paused_ids else ""),
        )
    )
    held = [r.id for r in paused]
    checks.append(
        Check(
            "paused runs",
            "ok",
            f"{_count(len(held))} paused"
            + (f": {_sample(held)} (`treadle resume RUN_ID` lets one go on)" if held else ""),
        )
    )
    runs = sorted({record.event.workflow_run_id for record in dead})
    checks.append(
        Check(
            "dead letters",
            "FAIL" if dead else "ok",
            f"{_count(len(dead))} event(s) in the DLQ"
            + (f" from run(s) {_sample(runs)}: fix the sink, then replay" if dead else ""),
        )
    )
    return checks


def _queues_check(
    queues: list[QueueInfo], worker_ttl: float, remote: dict[str, tuple[str, ...]]
) -> Check:
    """Queues with due jobs and no live worker; a queue of remote stages is the
    ``remote workers`` check's (``treadle worker`` cannot serve it)."""
    unserved = [q for q in queues if q.unserved and q.queue not in remote]
    if unserved:
        shown = ", ".join(f"{q.queue} ({q.queued} due)" for q in unserved)
        return Check(
            "queues",
            "warn",
            f"no live worker for {shown}: start one with `treadle worker --queue NAME`",
        )
    served = sorted({w for q in queues for w in q.workers})
    names = ", ".join(q.queue for q in queues) or "none in use"
    return Check(
        "queues",
        "ok",
        f"{names}; {len(served)} live worker(s) seen in the last {worker_ttl:g}s",
    )


def _remote_queues(cli: CliState) -> dict[str, tuple[str, ...]] | None:
    """Queue -> remote stage ids of the ``--app`` workflows; ``None`` without ``--app``."""
    from treadle.kernel.registry import Registry, remote_stages

    if cli.app is None:
        return None
    return remote_stages(Registry(load_app(cli.app, required=True)))


def _remote_check(
    remote: dict[str, tuple[str, ...]] | None, queues: list[QueueInfo], worker_ttl: float
) -> Check:
    """Queues of the app's remote stages (``define_stage(remote=True)``) that no live
    remote worker serves: their jobs wait for ever, since in-process workers refuse them."""
    if remote is None:
        return Check("remote workers", "skip", "pass --app to check the app's remote stages")
    if not remote:
        return Check("remote workers", "ok", "the app has no remote stages")
    by_queue = {q.queue: q for q in queues}
    missing = [queue for queue in remote if not (q := by_queue.get(queue)) or not q.workers]
    if missing:
        shown = "; ".join(
            f"{queue} (stages {', '.join(remote[queue])}; "
            f"{by_queue[queue].queued if queue in by_queue else 0} due)"
            for queue in missing
        )
        return Check(
            "remote workers",
            "warn",
            f"no live remote worker in the last {worker_ttl:g}s for {shown}: start one "
            "against `treadle serve` (docs/remote-workers.md)",
        )
    live = sorted({w for queue in remote for w in by_queue[queue].workers})
    return Check(
        "remote workers",
        "ok",
        f"{', '.join(remote)} served by {len(live)} live remote worker(s): {_sample(live)}",
    )


async def diagnose(cli: CliState, limits: Thresholds) -> list[Check]:
    """Every check, stopping at the first one the rest depend on."""
    from treadle.runtime.backends import backend_kind

    try:
        kind = backend_kind(cli.db)
    except Exception as exc:
        return [Check("connectivity", "FAIL", _why(exc, cli.db))]
    checks: list[Check] = []
    if kind == "memory":
        checks += [
            Check("connectivity", "ok", "memory:// (in this process only; nothing persists)"),
            Check("schema", "skip", "memory:// has no schema"),
            Check("clock skew", "skip", "memory:// uses this machine's clock"),
        ]
    else:
        try:
            probe = await asyncio.to_thread(sql_probe, cli.db)
        except Exception as exc:
            return [
                Check("connectivity", "FAIL", _why(exc, cli.db)),
                Check("schema", "skip", "database unreachable"),
            ]
        checks.append(Check("connectivity", "ok", f"{kind}, SELECT 1 in {probe['latency']:.3f}s"))
        if probe["revision"] != probe["head"]:
            found = probe["revision"] or "no Treadle schema"
            checks.append(
                Check("schema", "FAIL", f"{found}, need {probe['head']}: run `treadle migrate`")
            )
            return checks
        checks.append(Check("schema", "ok", f"at head revision {probe['head']}"))
        checks.append(_skew_check(probe["skew"], probe["round_trip"], limits.max_skew))
    try:
        checks += await _storage_checks(cli, kind, limits)
    except Exception as exc:
        checks.append(Check("storage", "FAIL", _why(exc, cli.db)))
    return checks


def doctor(
    ctx: typer.Context,
    max_skew: Annotated[
        float, seconds_option("Clock skew (seconds) above which the check fails.")
    ] = 5.0,
    stuck_threshold: Annotated[
        float, seconds_option("Seconds a RUNNING run may be idle.")
    ] = 1800.0,
    stale_lease_threshold: Annotated[
        float, seconds_option("Seconds a leased job may go without heartbeat.")
    ] = 60.0,
    pending_threshold: Annotated[
        float, seconds_option("Seconds a run may stay PENDING before a warning.")
    ] = 300.0,
    overdue_threshold: Annotated[
        float, seconds_option("Seconds a suspended stage's poll may be late.")
    ] = 300.0,
    worker_ttl: Annotated[
        float, seconds_option("Seconds since its last beat for a worker to count as live.")
    ] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Check connectivity, schema, clock skew, stuck work and the DLQ; exit 1 on a failure."""
    cli = state(ctx, db=db, app=app)
    limits = Thresholds(
        max_skew=max_skew,
        stuck=stuck_threshold,
        stale_lease=stale_lease_threshold,
        pending=pending_threshold,
        overdue=overdue_threshold,
        worker_ttl=worker_ttl,
    )

    async def go() -> list[Check]:
        return await diagnose(cli, limits)

    checks = run_async(go, db=cli.db)
    failed = [c.name for c in checks if c.level == "FAIL"]
    if as_json:
        echo_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        from rich.table import Table
        from rich.text import Text

        table = Table()
        for column in ("check", "result", "detail"):
            table.add_column(column)
        for check in checks:
            table.add_row(check.name, Text(check.level, style=_STYLE[check.level]), check.detail)
        out = console()
        # The URL on a line of its own, never wrapped or cut to the table's width: it is
        # what an operator copies to check which database was diagnosed.
        out.print(f"treadle doctor: {redact_url(cli.db)}", soft_wrap=True)
        out.print(table)
    if failed:
        typer.echo(f"doctor: failed check(s): {', '.join(failed)}", err=True)
        raise typer.Exit(EXIT_FAILURE)
