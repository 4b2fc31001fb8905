"""Job releases that failed while storage was down, retried until it answers again.

A host hands a leased job back with ``job.release``: on purpose when it stops
(``interrupted``), or after ``job.execute`` raised (``errored``). When the database is
restarting, that release fails too, and the job would sit LEASED until its lease
expired (60 s by default) before ``lease.reapStale`` freed it. ``ReleaseRetries``
keeps such releases and dispatches them again with capped exponential backoff, so the
jobs move as soon as storage is back. A retried release is safe: the command acts
only while this worker still holds that very attempt's lease.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from treadle.kernel.errors import StorageError, TreadleError, describe_exception
from treadle.runtime.backoff import Backoff

if TYPE_CHECKING:
    from treadle.kernel import commands as c
    from treadle.kernel.kernel import Kernel

RETRY_INITIAL_DELAY = 0.1
"""Seconds before the first retry of a failed release; doubles up to ``RETRY_MAX_DELAY``."""

RETRY_MAX_DELAY = 5.0


class ReleaseRetries:
    """Failed ``job.release`` commands of one host, retried in order with backoff.

    ``add`` starts one background task that retries until every release went through
    (or was refused as no longer this worker's: the lease moved on, nothing to do).
    An error the kernel raises on purpose (a ``TreadleError`` that is not retryable,
    such as an unknown job) drops that release instead of retrying it forever.
    ``flush`` makes one last pass for a host that is stopping; ``aclose`` gives up."""

    def __init__(
        self,
        kernel: Kernel,
        logger: Any,
        *,
        initial_delay: float = RETRY_INITIAL_DELAY,
        max_delay: float = RETRY_MAX_DELAY,
    ) -> None:
        self._kernel = kernel
        self._log = logger
        self._backoff = Backoff(initial_delay, max_delay)
        self._pending: dict[str, c.JobRelease] = {}
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, command: c.JobRelease) -> None:
        """Retry ``command`` until it goes through (a newer one for the job replaces it)."""
        self._pending[command.job_id] = command
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._retry(), name="treadle:release-retries")

    async def wait_idle(self) -> None:
        """Until no release is pending."""
        await self._idle.wait()

    async def flush(self) -> None:
        """One pass over the pending releases now, without waiting for the backoff."""
        await self._pass()

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])
        if self._pending:
            self._log.warning("job.releases_abandoned", jobs=sorted(self._pending))

    async def __aenter__(self) -> ReleaseRetries:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _retry(self) -> None:
        while self._pending:
            await asyncio.sleep(self._backoff.next())
            await self._pass()
        self._backoff.reset()

    async def _pass(self) -> None:
        for job_id, command in list(self._pending.items()):
            try:
                result = await self._kernel.dispatch(command)
            except TreadleError as exc:
                if exc.retryable or isinstance(exc, StorageError):
                    self._log.warning("job.release_retry_failed", job_id=job_id, error=str(exc))
                    return  # storage still down: wait for the next backoff step
                self._log.error("job.release_dropped", job_id=job_id, error=describe_exception(exc))
            except Exception as exc:
                self._log.warning(
                    "job.release_retry_failed", job_id=job_id, error=describe_exception(exc)
                )
                return
            else:
                self._log.info(
                    "job.released" if result.released else "job.release_skipped",
                    job_id=job_id,
                    reason=command.reason,
                    retried=True,
                )
            if self._pending.get(job_id) is command:
                del self._pending[job_id]
        if not self._pending:
            self._backoff.reset()
            self._idle.set()
