"""The ``treadle`` Typer application: global options and command registration.

``--app module:attr`` names the workflows (``TREADLE_APP``), ``--db`` the database
(``TREADLE_DATABASE_URL``, default ``sqlite:///treadle.db``). Commands live in
``commands``, ``runs``, ``doctor`` and ``demo``; this module only wires them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from treadle.hosts.cli import commands
from treadle.hosts.cli.common import APP_ENV, DB_ENV, DEFAULT_DB, CliState
from treadle.hosts.cli.demo import demo
from treadle.hosts.cli.doctor import doctor
from treadle.hosts.cli.runs import runs_app


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
    app.add_typer(runs_app, name="runs")
    app.command()(doctor)
    app.command()(demo)
    return app


def main() -> None:
    """The ``treadle`` console script."""
    build_app()(prog_name="treadle")
