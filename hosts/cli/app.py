"""The ``treadle`` Typer application: global options and command registration.

``--app module:attr`` names the workflows (``TREADLE_APP``), ``--db`` the database
(``TREADLE_DATABASE_URL``, default ``sqlite:///treadle.db``); each command takes them
too (``common.DbOption``). Commands live in ``commands``, ``steer``, ``runs``,
``schedules``, ``costs``, ``serve``, ``doctor`` and ``demo``; this module only wires them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from treadle.hosts.cli import commands, lifecycle, steer
from treadle.hosts.cli.common import APP_ENV, DB_ENV, DEFAULT_DB, CliState
from treadle.hosts.cli.costs import costs
from treadle.hosts.cli.demo import demo
from treadle.hosts.cli.doctor import doctor
from treadle.hosts.cli.runs import runs_app
from treadle.hosts.cli.schedules import schedules_app
from treadle.hosts.cli.serve import serve


def _version(value: bool) -> None:
    if value:
        from treadle import __version__

        typer.echo(f"treadle {__version__}")
        raise typer.Exit()


def _root(
    ctx: typer.Context,
    app: Annotated[
        str | None,
        typer.Option(
            "--app",
            envvar=APP_ENV,
            metavar="MODULE:ATTR",
            help="The workflows: a module attribute holding a workflow or a list of them.",
        ),
    ] = None,
    db: Annotated[
        str,
        typer.Option(
            "--db",
            envvar=DB_ENV,
            metavar="URL",
            help="Database URL: sqlite:///file.db, postgresql+psycopg://..., memory://.",
        ),
    ] = DEFAULT_DB,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Treadle: run, watch and repair durable workflows."""
    ctx.obj = CliState(db=db, app=app)


def build_app() -> typer.Typer:
    """A fresh Typer app (tests and ``main`` each build their own; nothing at import)."""
    app = typer.Typer(
        name="treadle",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    commands.register(app)
    lifecycle.register(app)
    for fn in (steer.query, steer.update, steer.review):
        app.command()(fn)
    app.command()(serve)
    app.add_typer(runs_app, name="runs")
    app.add_typer(schedules_app, name="schedules")
    app.command()(costs)
    app.command()(doctor)
    app.command()(demo)
    return app


def main() -> None:
    """The ``treadle`` console script."""
    build_app()(prog_name="treadle")
