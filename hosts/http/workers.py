"""The remote worker protocol: ``/api/v1/workers/...`` (``docs/remote-workers.md``).

A remote worker, in any language, leases jobs of remote stages
(``define_stage(..., remote=True)``) over HTTP and reports their outcome:

- ``POST /api/v1/workers/{id}/lease``: long-poll (``wait`` seconds) for up to
  ``max_jobs`` jobs of the given ``queues`` / ``stage_ids``; each is leased with
  ``JobTransport.dequeue`` and started with the kernel's ``job.begin``;
- ``POST .../heartbeat``: extend a lease (``job.heartbeat``), and say the worker is alive;
- ``POST .../complete``, ``.../fail``, ``.../suspend``: ``job.complete`` / ``job.fail`` /
  ``job.suspend``, phase 3 of ``job.execute``;
- ``POST .../leave``: the worker stops (its registry entry goes);
- ``GET /api/v1/workers/stages``: the remote stages, with JSON Schemas of their input,
  output and config.

Only the kernel decides: leases, attempts, retries, the idempotency of a repeated
outcome (each carries the key ``remote:<job id>:<attempt>:<kind>``) and the ghost rule
are the in-process worker's. What this module adds is who may touch a job: every lease
comes with a **lease token**, an HMAC over (job id, worker id, attempt, caller) under the
server's lease secret, and every call about that job must present it. A caller with
another token, another worker id or a stale attempt gets 403; without the ``worker``
scope, 403 as well.

Wake-ups: a waiting lease is woken when a commit of this process queues a job on a
remote queue (``adapters/queued_jobs.py``) or makes one due (a retry, a resumed
suspension: the persistence's due watchers), and by the backend's wake source for
commits of other processes (PostgreSQL ``LISTEN/NOTIFY``); besides, it polls storage
every ``poll_interval`` (other SQLite processes, the in-memory backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from treadle.adapters.logging import structlog_logger
from treadle.hosts.http.auth import Principal
from treadle.hosts.http.deps import ApiError, require_scope
from treadle.hosts.http.state import HttpState, http_state
from treadle.kernel import commands as c
from treadle.kernel.errors import describe_exception
from treadle.kernel.model import JsonValue, WorkerInfo
from treadle.kernel.registry import remote_stages
from treadle.runtime.jobs import DEFAULT_HEARTBEAT_INTERVAL

if TYPE_CHECKING:
    from treadle.engine import Engine
    from treadle.kernel.definitions import StageDefinition
    from treadle.kernel.model import Job

__all__ = [
    "LEASE_SECRET_ENV",
    "RemoteWorkerProtocol",
    "mount",
    "workers_router",
]

LEASE_SECRET_ENV = "TREADLE_LEASE_SECRET"
"""Environment variable holding the lease-token secret; servers sharing one database
behind a load balancer need the same one, and it keeps leases valid across restarts."""

_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
MAX_WAIT = 60.0
"""The longest a lease call waits for work (seconds)."""


class Caller(Protocol):
    """Who calls (``hosts/http/auth.Principal``): a stable ``name`` and its scopes."""

    @property
    def name(self) -> str: ...

    def has(self, scope: str) -> bool: ...


class ProtocolError(Exception):
    """A refused worker call (never leaves this module: the router answers it as
    ``ApiError``); ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field

    @property
    def http_code(self) -> str:
        """The answer's ``code``: ``Forbidden``, ``NotFound`` or ``InvalidWorkerRequest``."""
        return {403: "Forbidden", 404: "NotFound"}.get(self.status, "InvalidWorkerRequest")


# -- request bodies ---------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeaseRequest(_Body):
    queues: list[str] | None = None
    """Queues of remote stages to take jobs from (default: all of them)."""
    stage_ids: list[str] | None = None
    """Remote stages to take jobs of (default: every remote stage of ``queues``)."""
    wait: float = Field(default=20.0, ge=0, le=MAX_WAIT)
    """Seconds to wait for a job before answering with none."""
    max_jobs: int = Field(default=1, ge=1, le=64)


class LeaseRef(_Body):
    job_id: str = Field(min_length=1, max_length=128)
    lease_token: str = Field(min_length=1, max_length=200)


class HeartbeatRequest(_Body):
    job_id: str | None = Field(default=None, min_length=1, max_length=128)
    lease_token: str | None = Field(default=None, min_length=1, max_length=200)


class CompleteRequest(LeaseRef):
    output: JsonValue = None


class FailRequest(LeaseRef):
    error: str = Field(min_length=1, max_length=10_000)
    error_type: str | None = Field(default=None, max_length=200)
    retryable: bool = True


class SuspendRequest(LeaseRef):
    state: JsonValue = None
    poll_interval: float = Field(gt=0)
    """Seconds until the stage is leased again (with ``resume_state`` = ``state``)."""
    max_wait: float = Field(default=86_400.0, gt=0)
    """Seconds after which a stage still suspended fails."""


# -- the protocol, free of FastAPI --------------------------------------------------------
class RemoteWorkerProtocol:
    """What the router does, callable without HTTP (and tested so)."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_secret: bytes | str | None = None,
        poll_interval: float = 0.5,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        logger: Any = None,
    ) -> None:
        if lease_secret is None:
            lease_secret = os.environ.get(LEASE_SECRET_ENV) or os.urandom(32)
        self._secret = lease_secret.encode() if isinstance(lease_secret, str) else lease_secret
        self.engine = engine
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.log = logger or structlog_logger("treadle.hosts.http.workers")
        self._started: dict[str, datetime] = {}
        self._queues_of: dict[str, list[str]] = {}
        self._wake = asyncio.Event()
        self._unsubscribe: list[Callable[[], None]] = []

    # -- wake-ups ------------------------------------------------------------------------
    def _subscribe(self) -> None:
        """Listen for new work once, on the running loop (the first lease call)."""
        if self._unsubscribe:
            return
        self._unsubscribe.append(lambda: None)  # marks the attempt even if nothing listens
        backend = self.engine.backend
        source = getattr(backend, "wake_source", None)
        if source is not None:
            self._unsubscribe.append(source.subscribe(lambda _kind: self._notify()))
        persistence = self.engine.kernel.deps.persistence
        watch = getattr(persistence, "watch_due", None)
        if watch is not None:
            self._unsubscribe.append(watch(self._on_due))
        watch_queued = getattr(persistence, "watch_queued", None)
        if watch_queued is not None:
            remote = frozenset(remote_stages(self.engine.kernel.deps.registry))

            def on_queued(queues: frozenset[str]) -> None:
                if queues & remote:
                    self._notify()

            self._unsubscribe.append(watch_queued(on_queued))

    def _on_due(self, due: Any) -> None:
        when = getattr(due, "job", None)
        if not isinstance(when, datetime):
            return
        delay = (when - self.engine.kernel.deps.clock.now()).total_seconds()
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._notify)

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def close(self) -> None:
        for stop in self._unsubscribe:
            stop()
        self._unsubscribe.clear()

    # -- tokens --------------------------------------------------------------------------
    def lease_token(self, job_id: str, worker_id: str, attempt: int, caller: Caller) -> str:
        message = f"{job_id}\x1f{worker_id}\x1f{attempt}\x1f{caller.name}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:40]
        return f"{attempt}.{digest}"

    def _attempt(self, ref: LeaseRef, worker_id: str, caller: Caller) -> int:
        """The lease's attempt if ``ref`` carries this worker's token for it, else 403."""
        head, _, _ = ref.lease_token.partition(".")
        if head.isdigit() and int(head) >= 1:
            attempt = int(head)
            expected = self.lease_token(ref.job_id, worker_id, attempt, caller)
            if hmac.compare_digest(expected, ref.lease_token):
                return attempt
        raise ProtocolError(
            403,
            f"job {ref.job_id!r} is not leased to worker {worker_id!r} with this token",
            "lease_token",
        )

    # -- calls ---------------------------------------------------------------------------
    def stages(self) -> list[dict[str, Any]]:
        """Every remote stage with its queue and JSON Schemas."""
        seen: dict[str, dict[str, Any]] = {}
        for wf in _definitions(self.engine):
            for stage_id, stage in wf.stages.items():
                if not stage.remote:
                    continue
                entry = seen.get(stage_id)
                if entry is None:
                    entry = seen[stage_id] = _describe(stage, wf.queue_of(stage_id))
                if wf.id not in entry["workflows"]:
                    entry["workflows"].append(wf.id)
        return list(seen.values())

    def _served(self, body: LeaseRequest) -> tuple[list[str], list[str]]:
        remote = remote_stages(self.engine.kernel.deps.registry)
        if not remote:
            raise ProtocolError(404, "no remote stages are registered (define_stage(remote=True))")
        queues = list(remote) if body.queues is None else body.queues
        for index, queue in enumerate(queues):
            if queue not in remote:
                raise ProtocolError(
                    422,
                    f"queues[{index}]: {queue!r} holds no remote stage; "
                    f"remote queues: {sorted(remote)}",
                    f"queues[{index}]",
                )
        offered = [stage_id for queue in queues for stage_id in remote[queue]]
        if body.stage_ids is None:
            return queues, offered
        for index, stage_id in enumerate(body.stage_ids):
            if stage_id not in offered:
                raise ProtocolError(
                    422,
                    f"stage_ids[{index}]: {stage_id!r} is not a remote stage of "
                    f"{queues}; remote stages there: {offered}",
                    f"stage_ids[{index}]",
                )
        return queues, list(body.stage_ids)

    async def _beat(self, worker_id: str, queues: list[str], host: str) -> None:
        registry = getattr(self.engine.backend, "workers", None)
        if registry is None:
            return
        now = self.engine.kernel.deps.clock.now()
        started = self._started.setdefault(worker_id, now)
        try:
            await registry.beat(
                WorkerInfo(
                    worker_id=worker_id,
                    queues=tuple(queues),
                    host=host,
                    started_at=started,
                    heartbeat_at=now,
                )
            )
        except Exception as exc:  # liveness is advisory; never fail a lease for it
            self.log.warning(
                "remote.beat_failed", worker_id=worker_id, error=describe_exception(exc)
            )

    async def lease(
        self,
        worker_id: str,
        body: LeaseRequest,
        caller: Caller,
        *,
        host: str = "",
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> dict[str, Any]:
        _check_worker(worker_id)
        queues, stage_ids = self._served(body)
        self._subscribe()
        self._queues_of[worker_id] = queues
        await self._beat(worker_id, queues, host)
        kernel = self.engine.kernel
        deadline = time.monotonic() + body.wait
        while True:
            wake = self._wake
            jobs = await kernel.deps.job_transport.dequeue(
                worker_id,
                kernel.deps.clock.now(),
                limit=body.max_jobs,
                queues=queues,
                stage_ids=stage_ids,
            )
            leased = [await self._begin(job, worker_id, caller) for job in jobs]
            found = [entry for entry in leased if entry is not None]
            if found and disconnected is not None and await disconnected():
                await self._hand_back(found, worker_id)
                return {"jobs": []}
            if found:
                return {"jobs": found}
            if jobs:  # ghosts (cancelled or paused meanwhile): look again at once
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {"jobs": []}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(remaining, self.poll_interval))
            if disconnected is not None and await disconnected():
                return {"jobs": []}

    async def _begin(self, job: Job, worker_id: str, caller: Caller) -> dict[str, Any] | None:
        try:
            begun = await self.engine.kernel.dispatch(
                c.JobBegin(job_id=job.id, worker_id=worker_id)
            )
        except Exception as exc:  # job.begin released the job; the next lease goes on
            self.log.error("remote.begin_failed", job_id=job.id, error=describe_exception(exc))
            return None
        if not begun.started:
            return None
        data = begun.model_dump(mode="json", exclude={"started", "reason"})
        data["lease_token"] = self.lease_token(job.id, worker_id, begun.attempt, caller)
        data["heartbeat_interval"] = self.heartbeat_interval
        return data

    async def _hand_back(self, found: list[dict[str, Any]], worker_id: str) -> None:
        """The client went away with jobs leased for it: release them (attempt refunded)."""
        for entry in found:
            try:
                await self.engine.kernel.dispatch(
                    c.JobRelease(
                        job_id=entry["job_id"],
                        worker_id=worker_id,
                        attempt=entry["attempt"],
                        reason="interrupted",
                        error="remote worker disconnected before receiving the lease",
                    )
                )
            except Exception as exc:  # the lease expires and lease.reapStale releases it
                self.log.warning("remote.release_failed", error=describe_exception(exc))

    async def heartbeat(
        self, worker_id: str, body: HeartbeatRequest, caller: Caller, *, host: str = ""
    ) -> dict[str, Any]:
        _check_worker(worker_id)
        await self._beat(worker_id, self._queues_of.get(worker_id, []), host)
        if body.job_id is None and body.lease_token is None:
            return {"held": None, "cancelled": None}
        if body.job_id is None or body.lease_token is None:
            raise ProtocolError(422, "job_id and lease_token go together", "lease_token")
        ref = LeaseRef(job_id=body.job_id, lease_token=body.lease_token)
        attempt = self._attempt(ref, worker_id, caller)
        result = await self.engine.kernel.dispatch(
            c.JobHeartbeat(job_id=ref.job_id, worker_id=worker_id, attempt=attempt)
        )
        return result.model_dump(mode="json")

    async def complete(
        self, worker_id: str, body: CompleteRequest, caller: Caller
    ) -> dict[str, Any]:
        return await self._report(
            c.JobComplete, "complete", worker_id, body, caller, output=body.output
        )

    async def fail(self, worker_id: str, body: FailRequest, caller: Caller) -> dict[str, Any]:
        return await self._report(
            c.JobFail,
            "fail",
            worker_id,
            body,
            caller,
            error=body.error,
            error_type=body.error_type,
            retryable=body.retryable,
        )

    async def suspend(self, worker_id: str, body: SuspendRequest, caller: Caller) -> dict[str, Any]:
        return await self._report(
            c.JobSuspend,
            "suspend",
            worker_id,
            body,
            caller,
            state=body.state,
            poll_interval=timedelta(seconds=body.poll_interval),
            max_wait=timedelta(seconds=body.max_wait),
        )

    async def _report(
        self,
        command: type[c.JobComplete | c.JobFail | c.JobSuspend],
        outcome: str,
        worker_id: str,
        ref: LeaseRef,
        caller: Caller,
        **fields: Any,
    ) -> dict[str, Any]:
        """An outcome of a leased job, as its kernel command: the caller must hold the
        lease's token; a repeated report of the same attempt's outcome replays the first
        answer (the command's idempotency key)."""
        _check_worker(worker_id)
        attempt = self._attempt(ref, worker_id, caller)
        result: Any = await self.engine.kernel.dispatch(
            command(
                job_id=ref.job_id,
                worker_id=worker_id,
                attempt=attempt,
                idempotency_key=f"remote:{ref.job_id}:{attempt}:{outcome}",
                **fields,
            )
        )
        return _outcome(result)  # a JobExecuteResult: the three results extend it

    async def leave(self, worker_id: str) -> dict[str, Any]:
        _check_worker(worker_id)
        registry = getattr(self.engine.backend, "workers", None)
        if registry is not None:
            await registry.leave(worker_id)
        self._started.pop(worker_id, None)
        self._queues_of.pop(worker_id, None)
        return {"left": True}


def _check_worker(worker_id: str) -> None:
    if not _WORKER_ID.match(worker_id):
        raise ProtocolError(
            422,
            "worker id must be 1-128 letters, digits or '_.:@-' starting with a letter or digit",
            "worker_id",
        )


def _outcome(result: c.JobExecuteResult) -> dict[str, Any]:
    return result.model_dump(mode="json", exclude={"chained_job", "queued_jobs"})


def _definitions(engine: Engine) -> list[Any]:
    registry: Any = engine.kernel.deps.registry
    return list(registry) if isinstance(registry, Iterable) else []


def _describe(stage: StageDefinition, queue: str) -> dict[str, Any]:
    return {
        "stage_id": stage.id,
        "name": stage.name,
        "queue": queue,
        "workflows": [],
        "input_schema": (
            stage.input_adapter.json_schema() if stage.input_adapter is not None else None
        ),
        "output_schema": stage.output_adapter.json_schema(),
        "config_schema": (
            stage.config_model.model_json_schema() if stage.config_model is not None else None
        ),
        "max_attempts": stage.retry.max_attempts,
    }


# -- the FastAPI router -------------------------------------------------------------------
def mount(app: FastAPI, state: HttpState) -> None:
    """``create_app``'s hook (``app.OPTIONAL_MODULES``): the worker routes on ``app``, their
    ``RemoteWorkerProtocol`` kept as ``state.extras["workers"]``. Every route needs a
    token with the ``worker`` scope; a read-only app refuses them (403 ``ReadOnly``)."""
    protocol = RemoteWorkerProtocol(state.engine)
    state.extras["workers"] = protocol
    worker = require_scope("worker")

    async def caller(request: Request) -> Principal:
        principal = await worker(request)
        if http_state(request).read_only:
            raise ApiError(403, "ReadOnly", "this server is read-only: workers cannot lease")
        return principal

    app.include_router(workers_router(protocol, caller))


def workers_router(protocol: RemoteWorkerProtocol, caller: Callable[..., Any]) -> APIRouter:
    """The ``/api/v1/workers`` routes over ``protocol``. ``caller`` is the FastAPI
    dependency that authenticates a request (and checks its ``worker`` scope) and returns
    its ``Caller``. Refusals are ``{"error": {code, message, field}}`` answers (403 a job
    not leased by this worker with this token, 422 a bad queue, stage or worker id);
    kernel errors go to the app's error handlers."""
    router = APIRouter(prefix="/api/v1/workers", tags=["workers"])

    async def guarded(call: Awaitable[dict[str, Any]]) -> Any:
        try:
            return await call
        except ProtocolError as exc:
            raise ApiError(exc.status, exc.http_code, str(exc), field=exc.field) from None

    @router.get("/stages")
    async def stages(who: Caller = Depends(caller)) -> Any:
        return {"stages": protocol.stages()}

    @router.post("/{worker_id}/lease")
    async def lease(
        worker_id: str,
        body: LeaseRequest,
        request: Request,
        who: Caller = Depends(caller),
    ) -> Any:
        host = request.client.host if request.client is not None else ""
        return await guarded(
            protocol.lease(worker_id, body, who, host=host, disconnected=request.is_disconnected)
        )

    @router.post("/{worker_id}/heartbeat")
    async def heartbeat(
        worker_id: str,
        body: HeartbeatRequest,
        request: Request,
        who: Caller = Depends(caller),
    ) -> Any:
        host = request.client.host if request.client is not None else ""
        return await guarded(protocol.heartbeat(worker_id, body, who, host=host))

    @router.post("/{worker_id}/complete")
    async def complete(worker_id: str, body: CompleteRequest, who: Caller = Depends(caller)) -> Any:
        return await guarded(protocol.complete(worker_id, body, who))

    @router.post("/{worker_id}/fail")
    async def fail(worker_id: str, body: FailRequest, who: Caller = Depends(caller)) -> Any:
        return await guarded(protocol.fail(worker_id, body, who))

    @router.post("/{worker_id}/suspend")
    async def suspend(worker_id: str, body: SuspendRequest, who: Caller = Depends(caller)) -> Any:
        return await guarded(protocol.suspend(worker_id, body, who))

    @router.post("/{worker_id}/leave")
    async def leave(worker_id: str, who: Caller = Depends(caller)) -> Any:
        return await guarded(protocol.leave(worker_id))

    return router
