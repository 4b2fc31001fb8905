"""``treadle serve``: the HTTP API (and dashboard) with uvicorn, in this process.

``--worker`` runs an in-process worker beside it (the same ``engine.worker`` a small
app uses); without it the server only reads and steers, and separate ``treadle worker``
processes execute the runs. Auth: ``--token-file F`` or ``TREADLE_API_TOKENS`` (see
``treadle.hosts.http.auth`` for the format). Without a token the server is open to
anyone who can reach it, so it refuses to bind anything but a loopback address.

Signals: the first SIGTERM/SIGINT stops accepting requests, ends the live event
streams, lets requests in flight finish (``GRACEFUL_SECONDS`` at most), then drains the
worker; a second one exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from treadle.hosts.cli.common import (
    AppOption,
    DbOption,
    fail,
    open_engine,
    run_async,
    run_guarded,
    state,
)

if TYPE_CHECKING:
    from treadle.hosts.http.auth import TokenAuth

__all__ = ["DEFAULT_PORT", "is_loopback", "serve"]

DEFAULT_PORT: Final = 8233
GRACEFUL_SECONDS: Final = 10
EXIT_BAD_CONFIG: Final = 2


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.1``,
    ``::1``, ``localhost``); ``0.0.0.0``, ``::`` and other names are not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _auth(token_file: Path | None) -> TokenAuth | None:
    from treadle.hosts.http.auth import TokenAuth
    from treadle.kernel.errors import TreadleValidationError

    try:
        return TokenAuth.from_file(token_file) if token_file is not None else TokenAuth.from_env()
    except TreadleValidationError as exc:
        fail(f"--token-file: {exc.message}" if token_file else exc.message, EXIT_BAD_CONFIG)


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless a token is set).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = (
        DEFAULT_PORT
    ),
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="API tokens, one 'scope:token' a line (scopes read, act, worker). "
            "Default: $TREADLE_API_TOKENS.",
        ),
    ] = None,
    worker: Annotated[
        bool, typer.Option("--worker", help="Also run an in-process worker (needs --app).")
    ] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, max=1024, help="Stages the --worker runs at once.")
    ] = 4,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Refuse every action, whatever the token.")
    ] = False,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body accepted (413 above).")
    ] = 1_048_576,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics",
            help="Serve Prometheus metrics at /metrics (the otel extra; TREADLE_OTEL=1 or "
            "an OTLP endpoint also turns tracing on).",
        ),
    ] = False,
    db: DbOption = None,
    app: AppOption = None,
) -> None:
    """Serve the HTTP API (/api/v1, live events, /healthz, /readyz) and the dashboard."""
    cli = state(ctx, db=db, app=app)
    auth = run_guarded(lambda: _checked(host, token_file, worker=worker, app=cli.app))

    setup = run_guarded(lambda: _telemetry(metrics))

    async def go() -> None:
        from treadle.hosts.http import create_app

        telemetry = setup.telemetry if setup is not None else None
        async with open_engine(cli, create=worker, telemetry=telemetry) as engine:
            web = create_app(engine, auth=auth, read_only=read_only, max_body_bytes=max_body_bytes)
            server = _server(web, host, port)
            if worker:
                async with engine.worker(concurrency=concurrency):
                    await server.serve()
            else:
                await server.serve()

    try:
        run_async(go, db=cli.db)
    finally:
        if setup is not None:
            setup.shutdown()  # flush spans and metrics still buffered


def _telemetry(metrics: bool) -> Any:
    """OpenTelemetry for this process (``adapters/otel/setup.py``) when ``--metrics`` or
    the environment asks for it; ``None`` otherwise."""
    from treadle.adapters.otel_env import tracing_asked

    if not (metrics or tracing_asked()):
        return None
    try:
        from treadle.adapters.otel.setup import configure_from_env
    except ImportError as exc:
        fail(f"metrics and tracing need the 'otel' extra (pip install 'treadle[otel]'): {exc}")
    return configure_from_env(prometheus=metrics)


def _checked(
    host: str, token_file: Path | None, *, worker: bool, app: str | None
) -> TokenAuth | None:
    """The tokens, once the options make a server that is safe to start."""
    auth = _auth(token_file)
    if auth is None and not is_loopback(host):
        fail(
            f"refusing to serve on {host!r} without a token: anyone who can reach it could "
            "act on your runs. Pass --token-file (or set TREADLE_API_TOKENS), or bind "
            "127.0.0.1",
            EXIT_BAD_CONFIG,
        )
    if worker and app is None:
        fail("--worker needs the app: pass --app module:attr", EXIT_BAD_CONFIG)
    try:
        import uvicorn  # noqa: F401 - checked here for a clear message

        import treadle.hosts.http  # noqa: F401
    except ImportError as exc:
        fail(f"the HTTP server needs the 'server' extra (pip install 'treadle[server]'): {exc}")
    return auth


def _server(web: Any, host: str, port: int) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with Treadle's signal handling: the first signal ends the
        event streams and shuts down gracefully, then returns (so the worker drains and
        the engine closes) instead of re-raising the signal as uvicorn does."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()

            def on_signal(signum: int, _frame: Any) -> None:
                if self.should_exit:
                    self.force_exit = True
                    return
                self.should_exit = True
                loop.call_soon_threadsafe(_end_streams, web)

            previous = {
                sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        web,
        host=host,
        port=port,
        log_level="info",
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        server_header=False,
    )
    return Server(config)


def _end_streams(web: Any) -> None:
    state = web.state.treadle
    if state.hub is not None:  # kept referenced until done (the loop holds tasks weakly)
        state.extras["serve.closing"] = asyncio.ensure_future(state.hub.aclose())
