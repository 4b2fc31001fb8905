"""``open_backend(url)``: the composition root that turns a URL into a set of ports.

Every host and the ``Engine`` start here, so ``memory://``, ``sqlite:///file.db``
and ``postgresql://...`` mean the same thing everywhere. The SQL adapters are
imported inside the function: ``import treadle`` must not import SQLAlchemy, and
a memory-only install does not have it.

Schema policy: a SQLite file is created and migrated on open (it is the
zero-set-up embedded default, owned by one application); a PostgreSQL database
is shared by many workers and deploys, so its schema is only checked, and a
mismatch asks for ``treadle migrate`` unless ``auto_migrate=True``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from treadle.adapters.ai import PydanticAIClient
from treadle.adapters.clock import SystemClock
from treadle.adapters.cron import CroniterCalendar
from treadle.adapters.event_sinks import LogEventSink
from treadle.adapters.filesystem import FileSystemBlobStore
from treadle.adapters.memory import (
    CollectingEventSink,
    InMemoryBlobStore,
    InMemoryJobTransport,
    InMemoryPersistence,
    InMemoryScheduler,
    InMemoryWorkerRegistry,
)
from treadle.adapters.urls import redact_url, scrub
from treadle.kernel.ai import AIRecording, AIServices
from treadle.kernel.errors import StorageError, TreadleError
from treadle.kernel.kernel import Kernel, create_kernel

if TYPE_CHECKING:
    from treadle.ports import (
        BlobStore,
        Clock,
        EventSink,
        JobTransport,
        Persistence,
        Scheduler,
        WorkerRegistry,
    )
    from treadle.ports.wake_source import WakeSource

BackendKind = Literal["memory", "sqlite", "postgresql"]

DEFAULT_PAYLOAD_MAX_BYTES = 256 * 1024
"""Payloads above 256 KiB of JSON go to the blob store (``adapters.sql.payloads``)."""


_SQLITE_SCHEMES = ("sqlite", "sqlite+treadle", "sqlite+aiosqlite", "sqlite+pysqlite")
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


@dataclass
class Backend:
    """The ports for one URL. ``close()`` releases what ``open_backend`` opened."""

    url: str = field(repr=False)
    """As given, credentials included: show ``redact_url(backend.url)``, never this."""
    kind: BackendKind
    persistence: Persistence
    job_transport: JobTransport
    blob_store: BlobStore
    event_sink: EventSink
    scheduler: Scheduler
    clock: Clock
    wake_source: WakeSource | None = None
    """Pushes "jobs may be queued" to workers (PostgreSQL LISTEN/NOTIFY); None: poll only."""
    workers: WorkerRegistry | None = None
    """Which workers are alive and the queues they serve (``doctor``, ``engine.queues()``)."""

    def kernel(self, registry: Any, **options: Any) -> Kernel:
        """``create_kernel`` on these ports, with ``registry`` (a registry or an iterable
        of definitions) and any other ``create_kernel`` option (``logger``, ``ids``,
        ``plugins``, ``settings``); cron schedules use croniter unless ``cron`` says."""
        options.setdefault("cron", CroniterCalendar())
        options["ai"] = ai_services(options.get("ai"))
        return create_kernel(
            persistence=self.persistence,
            job_transport=self.job_transport,
            blob_store=self.blob_store,
            event_sink=self.event_sink,
            scheduler=self.scheduler,
            clock=self.clock,
            registry=registry,
            **options,
        )

    async def aclose(self) -> None:
        """Close the wake source, the event sink's connections (a webhook's), then the
        storage. ``async with backend:`` does it too."""
        if self.wake_source is not None:
            await self.wake_source.aclose()
        close_sink = getattr(self.event_sink, "aclose", None)
        if close_sink is not None:
            await close_sink()
        await self.persistence.aclose()

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def backend_kind(url: str) -> BackendKind:
    """Which backend a URL names; ``TreadleError`` listing the accepted forms otherwise."""
    given: object = url  # checked at runtime: URLs come from CLI flags and env vars
    if not isinstance(given, str) or "://" not in url:
        shown = repr(redact_url(url)) if isinstance(given, str) else repr(given)
        raise TreadleError(
            f"invalid database URL {shown}: use memory://, sqlite:///path/to/file.db "
            "or postgresql://user@host/db"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        return "memory"
    if scheme in _SQLITE_SCHEMES:
        return "sqlite"
    if scheme in _POSTGRES_SCHEMES:
        return "postgresql"
    raise TreadleError(
        f"unsupported database URL scheme {scheme!r} in {redact_url(url)!r}: use memory://, "
        "sqlite:///path/to/file.db or postgresql://user@host/db"
    )


BLOBS_ENV = "TREADLE_BLOBS_URL"
"""Where blobs go when ``blobs`` is not given: ``s3://bucket/prefix`` or a directory."""


def open_blob_store(blobs: str | os.PathLike[str]) -> BlobStore:
    """The blob store a location names: ``s3://bucket/prefix?...`` (``S3BlobStore``,
    the ``aws`` extra), ``memory://``, or a directory (``file:///path`` or a plain path:
    ``FileSystemBlobStore``)."""
    text: object = os.fspath(blobs)
    if not isinstance(text, str) or not text.strip():
        raise TreadleError(f"blobs must be s3://bucket/prefix or a directory, got {blobs!r}")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "s3":
        from treadle.adapters.aws.s3 import S3BlobStore

        try:
            return S3BlobStore.from_url(text)
        except ValueError as exc:
            raise TreadleError(f"blobs: {exc}") from exc
    if scheme == "memory":
        return InMemoryBlobStore()
    if scheme == "file":
        return FileSystemBlobStore(text.split("://", 1)[1])
    if scheme:
        raise TreadleError(
            f"unsupported blobs location {redact_url(text)!r}: use s3://bucket/prefix, "
            "file:///path or a directory"
        )
    return FileSystemBlobStore(text)


def _chosen_blob_store(
    blobs: str | os.PathLike[str] | BlobStore | None, blob_root: str | os.PathLike[str] | None
) -> BlobStore | None:
    """``blobs`` (a store or a location), else ``blob_root``, else ``$TREADLE_BLOBS_URL``;
    None: the backend's default."""
    if blobs is not None and blob_root is not None:
        raise TreadleError("pass blobs= or blob_root=, not both")
    if blobs is None:
        blobs = blob_root if blob_root is not None else (os.environ.get(BLOBS_ENV) or None)
    if blobs is None:
        return None
    if isinstance(blobs, str | os.PathLike):
        return open_blob_store(blobs)
    return blobs


def _chosen_event_sink(event_sink: EventSink | None) -> EventSink | None:
    """``event_sink``, else the webhook ``$TREADLE_WEBHOOK_URL`` names (None: default)."""
    if event_sink is not None or not os.environ.get("TREADLE_WEBHOOK_URL"):
        return event_sink
    from treadle.adapters.webhook import WebhookEventSink

    return WebhookEventSink.from_env()


async def open_backend(
    url: str,
    *,
    blobs: str | os.PathLike[str] | BlobStore | None = None,
    blob_root: str | os.PathLike[str] | None = None,
    auto_migrate: bool = False,
    clock: Clock | None = None,
    event_sink: EventSink | None = None,
    payload_max_bytes: int | None = DEFAULT_PAYLOAD_MAX_BYTES,
    **engine_options: Any,
) -> Backend:
    """Open the ports ``url`` names.

    - ``memory://``: in-memory adapters (one process, nothing survives it).
    - ``sqlite:///path.db``: the SQL adapters on that file, created and migrated now;
      blobs in ``<path.db>.blobs/`` beside it.
    - ``postgresql://`` or ``postgresql+psycopg://``: the SQL adapters, blobs in the
      database; the schema must be at head (``treadle migrate``) unless
      ``auto_migrate=True``.

    ``blobs`` puts blobs elsewhere: a ``BlobStore``, ``s3://bucket/prefix`` (S3, the
    ``aws`` extra) or a directory; without it, ``$TREADLE_BLOBS_URL`` when set.
    ``blob_root`` (a directory) is the older spelling. ``clock`` and ``event_sink``
    replace the defaults (``SystemClock``; a ``CollectingEventSink`` in memory, a
    ``LogEventSink`` on SQL, or the webhook ``$TREADLE_WEBHOOK_URL`` names when set).
    ``engine_options`` go to SQLAlchemy's engine.

    On SQL backends, JSON payloads (run input and output, stage output and state,
    events) larger than ``payload_max_bytes`` bytes are stored in the blob store and
    the row keeps a reference (``None``: always inline). The memory backend keeps
    everything in memory whatever the threshold.
    """
    kind = backend_kind(url)
    payload_max_bytes = _payload_threshold(payload_max_bytes)
    clock = clock if clock is not None else SystemClock()
    blob_store = _chosen_blob_store(blobs, blob_root)
    event_sink = _chosen_event_sink(event_sink)
    if kind == "memory":
        if engine_options:
            raise TreadleError(f"memory:// takes no engine options, got {sorted(engine_options)}")
        persistence = InMemoryPersistence()
        job_transport = InMemoryJobTransport(persistence)
        return Backend(
            url=url,
            kind=kind,
            persistence=persistence,
            job_transport=job_transport,
            blob_store=blob_store if blob_store is not None else InMemoryBlobStore(),
            event_sink=event_sink if event_sink is not None else CollectingEventSink(),
            scheduler=InMemoryScheduler(),
            clock=clock,
            workers=InMemoryWorkerRegistry(job_transport),
        )
    return await _open_sql(
        url,
        kind,
        blob_store=blob_store,
        auto_migrate=auto_migrate,
        clock=clock,
        event_sink=event_sink,
        payload_max_bytes=payload_max_bytes,
        engine_options=engine_options,
    )


def _payload_threshold(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TreadleError(f"payload_max_bytes must be a positive integer or None, got {value!r}")
    return value


def _sql_adapters() -> Any:
    try:
        import treadle.adapters.sql as sql
    except ImportError as exc:
        raise TreadleError(
            "SQL backends need SQLAlchemy, Alembic and aiosqlite, which `pip install treadle` "
            f"installs ('treadle[postgres]' adds PostgreSQL's driver): {exc}"
        ) from exc
    return sql


def _sqlite_path(url: str) -> Path:
    """The database file of a SQLite URL (``sqlite:///rel.db``, ``sqlite:////abs.db``)."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise TreadleError(
            f"{redact_url(url)!r} names no database file: use sqlite:///path/to/file.db "
            "(or memory:// for an in-memory engine)"
        )
    path = Path(database).expanduser()
    if not path.parent.is_dir():
        raise TreadleError(
            f"cannot create SQLite database {str(path)!r}: directory {str(path.parent)!r} "
            "does not exist"
        )
    return path


async def _open_sql(
    url: str,
    kind: BackendKind,
    *,
    blob_store: BlobStore | None,
    auto_migrate: bool,
    clock: Clock,
    event_sink: EventSink | None,
    payload_max_bytes: int | None,
    engine_options: dict[str, Any],
) -> Backend:
    sql = _sql_adapters()
    db_path = _sqlite_path(url) if kind == "sqlite" else None
    if kind == "postgresql" and not auto_migrate:
        await _check_schema(sql, url)
    try:
        persistence = await sql.SqlPersistence.open(
            url, migrate=kind == "sqlite" or auto_migrate, **engine_options
        )
    except TreadleError:
        raise
    except Exception as exc:  # Alembic's CommandError (e.g. a database newer than us)
        raise StorageError(
            f"could not open {redact_url(url)!r}: {type(exc).__name__}: {scrub(str(exc), url)}"
        ) from exc
    if blob_store is not None:
        pass
    elif db_path is not None:
        blob_store = FileSystemBlobStore(db_path.with_name(db_path.name + ".blobs"))
    else:
        blob_store = sql.SqlBlobStore(persistence)
    persistence.offload_payloads(blob_store, max_bytes=payload_max_bytes)
    return Backend(
        url=url,
        kind=kind,
        persistence=persistence,
        job_transport=sql.SqlJobTransport(persistence),
        blob_store=blob_store,
        event_sink=event_sink if event_sink is not None else LogEventSink(),
        # Durable and shared: any worker's maintenance tick drains the due commands.
        scheduler=sql.SqlScheduler(persistence),
        clock=clock,
        # Lazy: connects only when a worker subscribes, so a CLI holds no extra connection.
        wake_source=(
            sql.PgJobListener(url, own_backends=sql.backend_pids(persistence.engine))
            if kind == "postgresql"
            else None
        ),
        workers=sql.SqlWorkerRegistry(persistence),
    )


async def _check_schema(sql: Any, url: str) -> None:
    """Refuse a PostgreSQL schema that is not at this release's head revision: running
    new code on an old schema (or the reverse) corrupts work instead of failing fast."""
    from sqlalchemy import exc as sa_exc

    try:
        current = await asyncio.to_thread(sql.current_revision, url)
    except sa_exc.SQLAlchemyError as exc:
        from treadle.adapters.sql.errors import translate

        raise translate(exc, f"schema check of {redact_url(url)!r}") from exc
    head = sql.head_revision()
    if current == head:
        return
    found = "no Treadle schema" if current is None else f"schema revision {current!r}"
    raise TreadleError(
        f"database {redact_url(url)!r} has {found}, but this version of Treadle needs "
        f"revision {head!r}: run `treadle migrate --db <url>` (or pass auto_migrate=True)"
    )


def ai_services(given: AIServices | AIRecording | None) -> AIServices:
    """The kernel's AI set-up: ``given`` (an ``AIServices``, or an ``AIRecording`` policy)
    with the pydantic-ai client unless it names another (``adapters/ai.py``: it imports
    pydantic-ai only on the first call, so this costs a plain install nothing)."""
    if isinstance(given, AIServices):
        return given if given.client is not None else replace(given, client=PydanticAIClient())
    return AIServices(recording=given or AIRecording(), client=PydanticAIClient())
