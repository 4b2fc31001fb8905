"""What every ``treadle`` command shares: the global options, opening an ``Engine``,
and turning errors into one line on stderr.

Commands are thin: parse arguments, open the engine the global ``--db`` / ``--app``
name, call one ``Engine`` method, render. ``run_async`` is the one place where an
exception becomes an exit code, so no command can leak a traceback for bad input,
an unreachable database or a ``TreadleError``.

``--db`` and ``--app`` are options of the root and of each command (``DbOption``,
``AppOption``), because users type them on either side of the command name
(``treadle migrate --db URL``); ``state(ctx, db=..., app=...)`` merges the two, the
command's own value winning.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from treadle.adapters.urls import scrub
from treadle.kernel.errors import TreadleError
from treadle.runtime.options import MAX_SECONDS  # the bound of every duration option

if TYPE_CHECKING:
    from rich.console import Console

    from treadle.engine import Engine
    from treadle.kernel.definitions import WorkflowDefinition

T = TypeVar("T")

DEFAULT_DB = "sqlite:///treadle.db"
DB_ENV = "TREADLE_DATABASE_URL"
APP_ENV = "TREADLE_APP"
DEBUG_ENV = "TREADLE_DEBUG"
"""Set to 1 to let unexpected exceptions show their traceback (for bug reports)."""


EXIT_FAILURE = 1
"""A command that ran but failed: a run failed, a check failed, a tick step failed, an error."""


@dataclass(frozen=True)
class CliState:
    """The global options, stored on the Typer context by the root callback."""

    db: str = DEFAULT_DB
    app: str | None = None


class CliError(Exception):
    """An expected failure with a message for the operator (printed as one line)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        show_default=False,
        help=f"Database URL (as the global --db; default ${DB_ENV} or {DEFAULT_DB}).",
    ),
]
"""A command's own ``--db``: given after the command name, it wins over the root's."""

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        show_default=False,
        help=f"The workflows (as the global --app; default ${APP_ENV}).",
    ),
]
"""A command's own ``--app``: given after the command name, it wins over the root's."""


def state(ctx: typer.Context, *, db: str | None = None, app: str | None = None) -> CliState:
    """The global options of this invocation (defaults when a test calls a command alone),
    with the command's own ``--db`` / ``--app`` (``db``, ``app``) in place of the root's."""
    root = ctx.find_root()
    found = root.obj
    cli = found if isinstance(found, CliState) else CliState()
    if db is not None:
        cli = replace(cli, db=db)
    if app is not None:
        cli = replace(cli, app=app)
    return cli


def one_line(text: str) -> str:
    """Collapse a multi-line message (pydantic, SQLAlchemy) into one line."""
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return _drop_links(joined) or "(no message)"


def error_line(exc: BaseException, db: str | None = None) -> str:
    """The line shown for ``exc``: ``error: ...`` naming what went wrong. With ``db``, a
    credential of that URL repeated in the message (a driver's) is shown as ``***``."""
    if isinstance(exc, CliError):
        line = f"error: {one_line(exc.message)}"
    elif isinstance(exc, TreadleError):
        line = f"error: {exc.code}: {one_line(exc.message)}"
    else:
        line = f"error: {type(exc).__name__}: {one_line(str(exc))}"
    return scrub(line, db) if db else line


def _drop_links(text: str) -> str:
    """SQLAlchemy appends '(Background on this error at: https://...)' to its messages."""
    head, sep, _ = text.partition("(Background on this error at:")
    return head.rstrip() if sep else text


def seconds_option(text: str, *, at_least: float = 0) -> Any:
    """The ``typer.Option`` of a duration in seconds (``text`` is its help): from
    ``at_least`` to ``MAX_SECONDS``, so ``inf`` or ``1e300`` is a usage error naming the
    option (as ``nan`` and a negative number are) instead of an ``OverflowError`` later."""
    return typer.Option(min=at_least, max=MAX_SECONDS, help=text)


def fail(message: str, exit_code: int = EXIT_FAILURE) -> NoReturn:
    raise CliError(message, exit_code)


def run_async(fn: Callable[[], Coroutine[Any, Any, T]], *, db: str | None = None) -> T:
    """Run a command's coroutine under ``run_guarded``."""
    return run_guarded(lambda: asyncio.run(fn()), db=db)


def run_guarded(fn: Callable[[], T], *, db: str | None = None) -> T:
    """Call ``fn``; any error becomes one stderr line and exit code 1.

    ``typer.Exit`` passes through (a command's chosen exit code). ``TREADLE_DEBUG=1``
    re-raises unexpected exceptions so their traceback can be reported. ``db``, the
    URL the command uses: its credentials never reach the line (``error_line``).
    """
    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        expected = isinstance(exc, CliError | TreadleError)
        if not expected and os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        typer.echo(error_line(exc, db), err=True)
        code = exc.exit_code if isinstance(exc, CliError) else EXIT_FAILURE
        raise typer.Exit(code) from None


def parse_json(text: str | None, what: str) -> Any:
    """``text`` as JSON (``None`` stays ``None``); ``@path`` reads the JSON from a file.

    Anything that is not plain JSON fails as a ``CliError`` naming ``what``: a file that
    is not UTF-8, a syntax error, Python's extensions (``NaN``, ``Infinity``, a number
    too large for a float), an integer too long to convert, nesting deeper than
    ``MAX_JSON_DEPTH``.
    """
    if text is None:
        return None
    source = text
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as fh:
                source = fh.read()
        except OSError as exc:
            fail(f"{what}: cannot read {path!r}: {exc.strerror or exc}")
        except UnicodeDecodeError as exc:
            fail(f"{what}: {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})")
    try:
        value = json.loads(source, parse_constant=_not_json, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        fail(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except _NotJsonError as exc:
        fail(f"{what} is not valid JSON: {exc}")
    except RecursionError:
        fail(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    except ValueError:  # int() refuses integers past sys.get_int_max_str_digits()
        fail(f"{what}: an integer has more than {sys.get_int_max_str_digits()} digits")
    if _nesting(value) > MAX_JSON_DEPTH:
        fail(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


MAX_JSON_DEPTH = 100
"""How deep a JSON argument may nest. Real inputs stay far shallower; past ~255 levels the
payload serializer gives up, past ~1,000 the parser itself (``RecursionError``)."""


class _NotJsonError(ValueError):
    """A value ``json.loads`` accepts but JSON has not (``NaN``, ``1e999``)."""


def _not_json(constant: str) -> Any:
    raise _NotJsonError(f"{constant} is not a JSON value")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NotJsonError(f"{text} is out of range for a number")
    return number


def _nesting(value: Any) -> int:
    """How many arrays and objects deep ``value`` goes (iteratively: no recursion limit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def load_app(app: str | None, *, required: bool) -> list[WorkflowDefinition]:
    """The workflows ``--app module:attr`` names, through the hosts' shared loader."""
    if app is None:
        if required:
            fail(f"this command needs the app: pass --app module:attr (or set {APP_ENV})")
        return []
    from treadle.hosts.app import load_workflows

    return list(load_workflows(app))


def require_database(url: str) -> None:
    """Fail unless the SQLite file ``url`` names exists (other backends pass).

    ``Engine.open`` creates a missing SQLite file, which is right for ``start`` and the
    worker but wrong for a command that only reads or steers existing runs: a typo in
    ``--db`` would create and migrate an empty database and answer ``0 run(s)``."""
    from treadle.runtime.backends import backend_kind

    if backend_kind(url) != "sqlite":
        return
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return  # Engine.open names what is wrong with such a URL
    if not Path(database).expanduser().is_file():
        fail(
            f"no SQLite database at {database!r}: the file does not exist (check --db or "
            f"{DB_ENV}; `treadle migrate`, `start` and `worker` create one)"
        )


@asynccontextmanager
async def open_engine(
    cli: CliState, *, need_app: bool = False, create: bool = False, telemetry: Any = None
) -> AsyncIterator[Engine]:
    """An ``Engine`` on ``--db`` with the ``--app`` workflows, closed on exit. Without
    ``create`` a SQLite file must already exist (``require_database``). ``telemetry``:
    the engine's (``treadle serve --metrics``)."""
    from treadle.engine import Engine

    if not create:
        require_database(cli.db)
    workflows = load_app(cli.app, required=need_app)
    engine = await Engine.open(
        cli.db, workflows=workflows, logger=quiet_logger(), telemetry=telemetry
    )
    try:
        yield engine
    finally:
        await engine.aclose()


def console(*, stderr: bool = False, min_width: int = 160) -> Console:
    """A Rich console on the current stdout/stderr (looked up at call time, so test
    runners that swap the streams see the output). Written to a pipe or a log it is at
    least ``min_width`` wide: nothing wraps there, and ids stay whole. Markup is off:
    outputs and errors are user data (``[true]`` is JSON, not a style), so styles are
    given as ``Text`` objects."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False, soft_wrap=False, markup=False)
    if not out.is_terminal:
        out.width = max(out.width, min_width)
    return out


def quiet_logger() -> Any:
    """Errors only, on stderr. The kernel's warnings (a stage attempt failed and will be
    retried) are expected events that the commands show in their own output."""
    import logging

    import structlog

    from treadle.adapters.logging import add_trace_ids, renderer

    return structlog.wrap_logger(
        structlog.PrintLogger(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        processors=[
            structlog.processors.add_log_level,
            add_trace_ids,
            renderer(),
        ],
    )


def echo_json(data: Any, *, sort_keys: bool = True) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=sort_keys, default=str))
