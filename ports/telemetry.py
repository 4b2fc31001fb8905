"""The Telemetry port: traces of stage and step attempts, told by the kernel.

The kernel imports no tracing library. Where it runs a stage body, a code-workflow
activation or a step, it asks ``deps.telemetry`` (``None`` unless a host enabled
tracing: then nothing at all is called, so a disabled deployment pays one attribute
test per execution) for an ``AttemptSpan``, makes it current around the body (so the
user's own spans nest under it), reports how the attempt ended and what it waits on.
``treadle.adapters.otel.OtelTelemetry`` implements it on OpenTelemetry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from treadle.kernel.model import Job, Run

AttributeValue = str | int | float | bool
"""A span attribute or event attribute value (OpenTelemetry's primitive types)."""


class AttemptSpan(Protocol):
    """One attempt of a stage, an activation or a step, from start to outcome."""

    def active(self) -> AbstractContextManager[None]:
        """Make this attempt the current span in the calling task while the block runs."""
        ...

    def step(self, name: str, attempt: int, *, kind: str = "step") -> AttemptSpan:
        """A child attempt (a code-workflow step inside this activation), started now."""
        ...

    def event(self, name: str, attributes: Mapping[str, AttributeValue]) -> None:
        """Record a point in time on this attempt (a wait it suspends on, a wake-up)."""
        ...

    def end(
        self, outcome: str, *, error: BaseException | str | None = None, retrying: bool = False
    ) -> None:
        """The attempt ended: ``outcome`` (``completed``, ``suspended``, ``failed``,
        ``ghost``, ...), the error when it failed, whether another attempt follows.
        Idempotent: a second call changes nothing."""
        ...


class StartScope(Protocol):
    """A start in progress (``Engine.start``): the context the new run stores."""

    @property
    def trace_context(self) -> str | None:
        """The ``traceparent`` the run(s) store, ``None`` when there is none to join."""
        ...

    def started(self, run_id: str, workflow_id: str, created: bool = True) -> None:
        """A run was started (``created``: a new one, not an idempotent replay)."""
        ...


class Telemetry(Protocol):
    """What the kernel tells about the work it runs."""

    def stage_attempt(
        self, run: Run, stage_id: str, attempt: int, worker_id: str, *, kind: str
    ) -> AttemptSpan:
        """Start the span of one execution of ``stage_id`` of ``run`` (``kind``: ``stage``
        for a pipeline stage, ``activation`` for a code-workflow body's activation), a
        child of the trace context stored with the run (``run.trace_context``)."""
        ...

    def job_claimed(self, job: Job, now: datetime) -> None:
        """A host leased ``job`` (``treadle.claim.latency``: since it fell due)."""
        ...

    def leases_expired(self, count: int) -> None:
        """``lease.reapStale`` released ``count`` jobs whose worker stopped beating."""
        ...

    def starting(self, workflow_id: str, count: int = 1) -> AbstractContextManager[StartScope]:
        """Around a start of ``count`` runs: the caller's trace context to store."""
        ...

    def runs_ended(self, run_ids: Sequence[str], outcomes: Mapping[str, Run]) -> None:
        """A commit of this process ended runs (a ``watch_run_ends`` callback)."""
        ...

    def watch_worker(self, worker: Any) -> None:
        """Report ``worker``'s busy and total slots (``in_flight``, ``concurrency``)."""
        ...
