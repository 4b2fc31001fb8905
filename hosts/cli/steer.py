"""``treadle query``, ``treadle update`` and ``treadle review``: read and steer a code
workflow run from the shell, through ``Engine.query``, ``Engine.update`` and
``Engine.decide_review`` (``signal`` and ``cancel`` live in ``commands``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from treadle.hosts.cli.common import (
    AppOption,
    DbOption,
    echo_json,
    fail,
    open_engine,
    parse_json,
    run_async,
    seconds_option,
    state,
)
from treadle.kernel.workflows.model import JournalStatus

if TYPE_CHECKING:
    from treadle.engine import Engine

DECISIONS: dict[str, Literal["approved", "rejected"]] = {
    "approve": "approved",
    "approved": "approved",
    "reject": "rejected",
    "rejected": "rejected",
}


def query(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The code-workflow run.")],
    name: Annotated[str, typer.Argument(help="What the workflow publishes (ctx.publish).")],
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Print the value a code workflow last published under NAME, as JSON (null before
    its first publish). Read-only: the run is not woken."""
    cli = state(ctx, db=db, app=app)

    async def go() -> Any:
        async with open_engine(cli) as engine:
            return await engine.query(run_id, name)

    echo_json(run_async(go, db=cli.db))


def update(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The code-workflow run.")],
    name: Annotated[str, typer.Argument(help="The update the workflow waits for.")],
    payload_json: Annotated[
        str | None, typer.Argument(metavar="[PAYLOAD]", help="Payload as JSON, or @file.")
    ] = None,
    payload_option: Annotated[
        str | None,
        typer.Option("--payload", metavar="JSON", help="The payload (instead of PAYLOAD)."),
    ] = None,
    timeout: Annotated[
        float, seconds_option("Seconds to wait for the reply (a worker must run the run).")
    ] = 30.0,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Sending again with this key never sends twice.")
    ] = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Send an update to a code workflow waiting in ctx.wait_for_update and print its
    reply as JSON. Exit 1 if no reply comes within --timeout (the update stays
    delivered: resend with the same --idempotency-key to wait again)."""
    cli = state(ctx, db=db, app=app)
    if payload_json is not None and payload_option is not None:
        raise typer.BadParameter("give the payload once: as PAYLOAD or as --payload, not both")

    async def go() -> Any:
        payload = parse_json(payload_option if payload_json is None else payload_json, "PAYLOAD")
        async with open_engine(cli, need_app=True) as engine:
            try:
                return await engine.update(
                    run_id, name, payload, timeout=timeout, idempotency_key=idempotency_key
                )
            except TimeoutError as exc:
                fail(f"{exc} (is a worker running with this app?)")

    echo_json(run_async(go, db=cli.db))


def review(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The code-workflow run waiting in ctx.review.")],
    decision: Annotated[str, typer.Option(help="approve or reject.", metavar="approve|reject")],
    review_id: Annotated[
        str | None,
        typer.Option(help="Which review (default: the run's one waiting review)."),
    ] = None,
    reviewer: Annotated[str | None, typer.Option(help="Who decided (recorded).")] = None,
    comment: Annotated[str | None, typer.Option(help="Why (recorded).")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Deciding again with this key is a no-op.")
    ] = None,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Record a decision on a run's waiting review (ctx.review) and wake the run."""
    cli = state(ctx, db=db, app=app)
    verdict = DECISIONS.get(decision.strip().lower())
    if verdict is None:
        raise typer.BadParameter(
            f"{decision!r} is neither approve nor reject", param_hint="--decision"
        )

    async def go() -> str:
        async with open_engine(cli, need_app=True) as engine:
            chosen = review_id or await waiting_review(engine, run_id)
            await engine.decide_review(
                run_id,
                chosen,
                verdict,
                reviewer=reviewer,
                comment=comment,
                idempotency_key=idempotency_key,
            )
            return chosen

    chosen = run_async(go, db=cli.db)
    typer.echo(f"review {chosen} of {run_id}: {verdict}")


async def waiting_review(engine: Engine, run_id: str) -> str:
    """The id of the run's one waiting review; an error naming the choices otherwise."""
    waiting = [
        str((entry.input or {}).get("review_id"))
        for entry in await engine.journal(run_id)
        if entry.kind == "review" and entry.status is JournalStatus.WAITING
    ]
    if not waiting:
        fail(f"run {run_id} has no review waiting for a decision")
    if len(waiting) > 1:
        fail(
            f"run {run_id} has {len(waiting)} reviews waiting: pass --review-id, one of "
            + ", ".join(waiting)
        )
    return waiting[0]
