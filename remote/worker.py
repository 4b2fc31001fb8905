"""``RemoteWorker``: the Python client of the remote worker protocol.

::

    worker = RemoteWorker("http://treadle.internal:8233", token=..., worker_id="ocr-1")

    @worker.stage("ocr")
    async def ocr(job: RemoteJob) -> dict:
        return {"text": await read_pdf(job.input["url"])}

    await worker.run()          # until worker.stop(); or run(max_jobs=1)

A handler gets a ``RemoteJob`` (``input``, ``config``, ``attempt``, ``idempotency_key``,
``resume_state``, ``cancelled``) and returns the stage's output (a pydantic model is
dumped to JSON), returns ``RemoteSuspend(state, poll_interval)`` to be leased again later,
or raises: ``RemoteFailure(message, retryable=False)`` fails the stage for good, any other
exception fails this attempt under the stage's retry policy. Sync handlers run in a
thread. While a handler runs, its lease is heartbeated; when the server says the lease is
gone (run cancelled, lease expired), ``job.cancelled`` is set so the handler may stop,
and its result is discarded by the server (a ghost) anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

_log = logging.getLogger("treadle.remote")

Handler = Callable[["RemoteJob"], Any]


class RemoteFailure(Exception):  # noqa: N818 - a verdict the handler raises, named as such
    """Raise from a handler to fail the stage; ``retryable=False`` fails it for good."""

    def __init__(self, message: str, *, retryable: bool = True, error_type: str | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.error_type = error_type


@dataclass(frozen=True)
class RemoteSuspend:
    """Return from a handler to park the stage: it is leased again after
    ``poll_interval`` seconds with ``job.resume_state`` = ``state``."""

    state: Any = None
    poll_interval: float = 30.0
    max_wait: float = 86_400.0


@dataclass
class RemoteJob:
    """One leased job, as ``POST .../lease`` returned it."""

    job_id: str
    stage_id: str
    workflow_run_id: str
    workflow_id: str
    attempt: int
    stage_attempt: int
    idempotency_key: str
    input: Any
    config: Any
    resume_state: Any
    lease_token: str
    heartbeat_interval: float
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server says the lease is gone (run cancelled, lease expired)."""

    @classmethod
    def from_lease(cls, data: dict[str, Any]) -> RemoteJob:
        return cls(
            job_id=data["job_id"],
            stage_id=data["stage_id"],
            workflow_run_id=data["workflow_run_id"],
            workflow_id=data["workflow_id"],
            attempt=data["attempt"],
            stage_attempt=data["stage_attempt"],
            idempotency_key=data["idempotency_key"],
            input=data.get("input"),
            config=data.get("config"),
            resume_state=data.get("resume_state"),
            lease_token=data["lease_token"],
            heartbeat_interval=float(data.get("heartbeat_interval") or 15.0),
        )


class RemoteWorker:
    """Leases jobs of the stages it has handlers for and runs them (see the module doc).

    ``url``: the server's base URL; ``token``: a bearer token with the ``worker`` scope
    (``None`` for a server with open access); ``queues``: the remote queues to lease from
    (default: every queue of the registered stages); ``concurrency``: jobs run at once;
    ``wait``: seconds one lease call waits for work. ``client``: an ``httpx.AsyncClient``
    to use instead of one of its own (tests pass one on an ASGI transport)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        worker_id: str | None = None,
        queues: list[str] | None = None,
        concurrency: int = 1,
        wait: float = 20.0,
        client: httpx.AsyncClient | None = None,
        retry_delay: float = 1.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        if not 0 <= wait <= 60:
            raise ValueError(f"wait must be between 0 and 60 seconds, got {wait!r}")
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.queues = queues
        self.concurrency = concurrency
        self.wait = wait
        self.retry_delay = retry_delay
        self.handlers: dict[str, Handler] = {}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(wait + 30.0)
        )
        if client is not None and headers:
            self._client.headers.update(headers)
        self._stopping = asyncio.Event()
        self.completed = 0
        self.failed = 0

    # -- registry ------------------------------------------------------------------------
    def stage(self, stage_id: str) -> Callable[[Handler], Handler]:
        """Decorator: ``fn`` handles jobs of ``stage_id``."""

        def register(fn: Handler) -> Handler:
            self.register(stage_id, fn)
            return fn

        return register

    def register(self, stage_id: str, fn: Handler) -> None:
        if not stage_id or not isinstance(stage_id, str):
            raise ValueError("stage_id must be a non-empty string")
        if stage_id in self.handlers:
            raise ValueError(f"a handler for stage {stage_id!r} is registered already")
        self.handlers[stage_id] = fn

    # -- the loop ------------------------------------------------------------------------
    def stop(self) -> None:
        """Take no new jobs; ``run`` returns once the running ones have reported."""
        self._stopping.set()

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> RemoteWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self, *, max_jobs: int | None = None) -> None:
        """Lease and run jobs until ``stop()`` (or ``max_jobs`` have been run); leaves the
        server's worker list on the way out."""
        if not self.handlers:
            raise ValueError("register a handler first (@worker.stage('stage-id'))")
        running: set[asyncio.Task[None]] = set()
        started = 0
        try:
            while not self._stopping.is_set():
                if max_jobs is not None and started >= max_jobs:
                    break
                free = self.concurrency - len(running)
                if max_jobs is not None:
                    free = min(free, max_jobs - started)
                if free <= 0:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                jobs = await self._lease(free)
                for data in jobs:
                    task = asyncio.create_task(self._run_one(RemoteJob.from_lease(data)))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    started += 1
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            with contextlib.suppress(httpx.HTTPError):
                await self._client.post(f"/api/v1/workers/{self.worker_id}/leave")

    async def _lease(self, count: int) -> list[dict[str, Any]]:
        body: dict[str, Any] = {
            "stage_ids": sorted(self.handlers),
            "wait": self.wait,
            "max_jobs": count,
        }
        if self.queues is not None:
            body["queues"] = self.queues
        lease = asyncio.ensure_future(
            self._client.post(f"/api/v1/workers/{self.worker_id}/lease", json=body)
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([lease, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not lease.done():  # stopping: drop the call (the server hands back its leases)
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await lease
            return []
        try:
            response = lease.result()
        except httpx.HTTPError as exc:
            _log.warning("lease failed: %s; retrying in %.1fs", exc, self.retry_delay)
            await self._pause()
            return []
        if response.status_code >= 400:
            if response.status_code in (401, 403, 404, 422):
                raise RuntimeError(f"lease refused ({response.status_code}): {response.text}")
            _log.warning("lease answered %s: %s", response.status_code, response.text)
            await self._pause()
            return []
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.retry_delay)

    async def _run_one(self, job: RemoteJob) -> None:
        beat = asyncio.create_task(self._heartbeat(job))
        try:
            verdict = await self._call(job)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
        await self._report(job, verdict)

    async def _call(self, job: RemoteJob) -> tuple[str, dict[str, Any]]:
        handler = self.handlers[job.stage_id]
        try:
            if inspect.iscoroutinefunction(handler):
                value = await handler(job)
            else:
                value = await asyncio.to_thread(handler, job)
                if inspect.isawaitable(value):
                    value = await value
        except RemoteFailure as exc:
            return "fail", {
                "error": str(exc) or type(exc).__name__,
                "error_type": exc.error_type,
                "retryable": exc.retryable,
            }
        except Exception as exc:
            return "fail", {
                "error": str(exc) or type(exc).__name__,
                "error_type": type(exc).__name__,
            }
        if isinstance(value, RemoteSuspend):
            return "suspend", {
                "state": _jsonable(value.state),
                "poll_interval": value.poll_interval,
                "max_wait": value.max_wait,
            }
        return "complete", {"output": _jsonable(value)}

    async def _heartbeat(self, job: RemoteJob) -> None:
        body = {"job_id": job.job_id, "lease_token": job.lease_token}
        while True:
            await asyncio.sleep(job.heartbeat_interval)
            try:
                response = await self._client.post(
                    f"/api/v1/workers/{self.worker_id}/heartbeat", json=body
                )
            except httpx.HTTPError as exc:  # a missed beat costs at worst a re-lease
                _log.warning("heartbeat of job %s failed: %s", job.job_id, exc)
                continue
            if response.status_code == 200 and not response.json().get("held"):
                job.cancelled.set()

    async def _report(self, job: RemoteJob, verdict: tuple[str, dict[str, Any]]) -> None:
        """Send the outcome; retried on network errors (the server replays a repeated
        outcome of the same lease from its idempotency record)."""
        kind, fields = verdict
        body = {"job_id": job.job_id, "lease_token": job.lease_token, **fields}
        for attempt in range(5):
            try:
                response = await self._client.post(
                    f"/api/v1/workers/{self.worker_id}/{kind}", json=body
                )
            except httpx.HTTPError as exc:
                _log.warning("reporting job %s failed (%s), try %d", job.job_id, exc, attempt + 1)
                await asyncio.sleep(self.retry_delay * (attempt + 1))
                continue
            if response.status_code >= 400:
                _log.error(
                    "job %s: %s refused (%s): %s",
                    job.job_id,
                    kind,
                    response.status_code,
                    response.text,
                )
                return
            result = response.json()
            if result.get("ghost"):
                _log.warning(
                    "job %s: result discarded by the server: %s", job.job_id, result.get("error")
                )
            elif result.get("outcome") == "completed":
                self.completed += 1
            elif result.get("outcome") == "failed":
                self.failed += 1
            return
        _log.error("job %s: gave up reporting %s; its lease will expire", job.job_id, kind)


def _jsonable(value: Any) -> Any:
    """A pydantic model as its JSON form; anything else as it is (httpx encodes it)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return value
