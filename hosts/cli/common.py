"""What every ``treadle`` command shares: the global options, opening an ``Engine``,
and turning errors into one line on stderr.

Commands are thin: parse arguments, open the engine the global ``--db`` / ``--app``
name, call one ``Engine`` method, render. ``run_async`` is the one place where an
exception becomes an exit code, so no command can leak a traceback for bad input,
an unreachable database or a ``TreadleError``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

from treadle.kernel.errors import TreadleError
from treadle.kernel.limits import MAX_DEPTH

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


def state(ctx: typer.Context) -> CliState:
    """The global options of this invocation (defaults when a test calls a command alone)."""
    root = ctx.find_root()
    found = root.obj
    return found if isinstance(found, CliState) else CliState()


def one_line(text: str) -> str:
    """Collapse a multi-line message (pydantic, SQLAlchemy) into one line."""
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return _drop_links(joined) or "(no message)"


def error_line(exc: BaseException) -> str:
    """The line shown for ``exc``: ``error: ...`` naming what went wrong."""
    if isinstance(exc, CliError):
        return f"error: {one_line(exc.message)}"
    if isinstance(exc, TreadleError):
        return f"error: {exc.code}: {one_line(exc.message)}"
    return f"error: {type(exc).__name__}: {one_line(str(exc))}"


def _drop_links(text: str) -> str:
    """SQLAlchemy appends '(Background on this error at: https://...)' to its messages."""
    head, sep, _ = text.partition("(Background on this error at:")
    return head.rstrip() if sep else text


def fail(message: str, exit_code: int = EXIT_FAILURE) -> NoReturn:
    raise CliError(message, exit_code)


def run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command's coroutine under ``run_guarded``."""
    return run_guarded(lambda: asyncio.run(fn()))


def run_guarded(fn: Callable[[], T]) -> T:
    """Call ``fn``; any error becomes one stderr line and exit code 1.

    ``typer.Exit`` passes through (a command's chosen exit code). ``TREADLE_DEBUG=1``
    re-raises unexpected exceptions so their traceback can be reported.
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
        typer.echo(error_line(exc), err=True)
        code = exc.exit_code if isinstance(exc, CliError) else EXIT_FAILURE
        raise typer.Exit(code) from None


def parse_json(text: str | None, what: str) -> Any:
    """``text`` as JSON (``None`` stays ``None``); ``@path`` reads the JSON from a file."""
    if text is None:
        return None
    source = text
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as fh:
                source = fh.read()
        except OSError as exc:
            fail(f"{what}: cannot read {text[1:]!r}: {exc.strerror or exc}")
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        fail(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except RecursionError:
        fail(f"{what} is nested too deeply: Treadle stores at most {MAX_DEPTH} levels")


def load_app(app: str | None, *, required: bool) -> list[WorkflowDefinition]:
    """The workflows ``--app module:attr`` names, through the hosts' shared loader."""
    if app is None:
        if required:
            fail(f"this command needs the app: pass --app module:attr (or set {APP_ENV})")
        return []
    from treadle.hosts.app import load_workflows

    return list(load_workflows(app))


@asynccontextmanager
async def open_engine(cli: CliState, *, need_app: bool = False) -> AsyncIterator[Engine]:
    """An ``Engine`` on ``--db`` with the ``--app`` workflows, closed on exit."""
    from treadle.engine import Engine

    workflows = load_app(cli.app, required=need_app)
    engine = await Engine.open(cli.db, workflows=workflows, logger=quiet_logger())
    try:
        yield engine
    finally:
        await engine.close()


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

    return structlog.wrap_logger(
        structlog.PrintLogger(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.KeyValueRenderer(key_order=["event", "run_id", "stage_id"]),
        ],
    )


def redact(url: str) -> str:
    """The URL without its password, for output."""
    head, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{head}{sep}{creds.split(':', 1)[0]}:***@{host}"


def echo_json(data: Any, *, sort_keys: bool = True) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=sort_keys, default=str))
