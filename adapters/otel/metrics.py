"""Treadle's metrics on the OpenTelemetry metrics API.

Labels are low-cardinality on purpose: a workflow id, a stage id or step name (both
fixed by the code), an outcome, a queue name, a status; never a run id. Counters and
histograms are recorded where the work happens (in the process that did it, so a
Prometheus ``sum`` over processes is the deployment's total); the gauges that describe
shared state (queue depth, oldest waiting job, outbox lag, dead letters) are read from
storage by ``StorageGauges.refresh`` (a few cheap queries) and reported by observable
callbacks.

``METRIC_NAMES`` lists every metric as Prometheus names it (dots become underscores,
counters gain ``_total``, histograms ``_bucket``/``_sum``/``_count``), so the Grafana
dashboard and the docs can be checked against it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from treadle.kernel.model import Job, QueueDepth, Run, RunStatus

if TYPE_CHECKING:
    from treadle.ports import Clock, Persistence, WorkerRegistry


class SlotHolder(Protocol):
    """A worker whose slots the ``treadle.worker.slots.*`` gauges report."""

    @property
    def in_flight(self) -> int: ...

    concurrency: int


DURATION_BUCKETS: Sequence[float] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
)  # fmt: skip
"""Seconds: a no-op stage (about a millisecond) to an hour-long batch step."""

METRIC_NAMES: Mapping[str, str] = {
    "treadle_runs_started_total": "runs created, by workflow",
    "treadle_runs_completed_total": "runs that completed, by workflow",
    "treadle_runs_failed_total": "runs that failed, by workflow",
    "treadle_runs_cancelled_total": "runs cancelled or terminated, by workflow",
    "treadle_stage_duration_seconds": "stage attempts, by workflow, stage and outcome",
    "treadle_step_duration_seconds": "code-workflow step attempts, by workflow, step, outcome",
    "treadle_retries_total": "attempts that failed and will be retried, by workflow and kind",
    "treadle_claim_latency_seconds": "from a job falling due to a worker leasing it, by queue",
    "treadle_lease_expiries_total": "leases released because their worker stopped beating",
    "treadle_queue_depth": "jobs by queue and status (queued, scheduled, leased)",
    "treadle_queue_oldest_age_seconds": "age of the longest-waiting due job, by queue",
    "treadle_outbox_lag_seconds": "age of the oldest unpublished outbox event",
    "treadle_outbox_dead_letters": "events in the dead-letter queue (counted up to 10,000)",
    "treadle_worker_slots_busy": "stage slots executing now, in this process",
    "treadle_worker_slots": "stage slots of the workers in this process",
}
"""Prometheus name (without the ``_bucket``/``_sum``/``_count`` suffixes) -> meaning."""

DLQ_COUNT_CAP = 10_000
"""``treadle_outbox_dead_letters`` counts at most this many (one bounded read)."""


class TreadleMetrics:
    """The instruments, made once per ``Meter``; recording methods for the call sites."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.runs_started = meter.create_counter(
            "treadle.runs.started", unit="1", description=METRIC_NAMES["treadle_runs_started_total"]
        )
        self.runs_completed = meter.create_counter(
            "treadle.runs.completed",
            unit="1",
            description=METRIC_NAMES["treadle_runs_completed_total"],
        )
        self.runs_failed = meter.create_counter(
            "treadle.runs.failed", unit="1", description=METRIC_NAMES["treadle_runs_failed_total"]
        )
        self.runs_cancelled = meter.create_counter(
            "treadle.runs.cancelled",
            unit="1",
            description=METRIC_NAMES["treadle_runs_cancelled_total"],
        )
        self.stage_duration = meter.create_histogram(
            "treadle.stage.duration",
            unit="s",
            description=METRIC_NAMES["treadle_stage_duration_seconds"],
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.step_duration = meter.create_histogram(
            "treadle.step.duration",
            unit="s",
            description=METRIC_NAMES["treadle_step_duration_seconds"],
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries = meter.create_counter(
            "treadle.retries", unit="1", description=METRIC_NAMES["treadle_retries_total"]
        )
        self.claim_latency = meter.create_histogram(
            "treadle.claim.latency",
            unit="s",
            description=METRIC_NAMES["treadle_claim_latency_seconds"],
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.lease_expiries = meter.create_counter(
            "treadle.lease.expiries",
            unit="1",
            description=METRIC_NAMES["treadle_lease_expiries_total"],
        )
        self._workers: weakref.WeakSet[Any] = weakref.WeakSet()
        meter.create_observable_gauge(
            "treadle.worker.slots.busy",
            callbacks=[self._observe_busy],
            unit="1",
            description=METRIC_NAMES["treadle_worker_slots_busy"],
        )
        meter.create_observable_gauge(
            "treadle.worker.slots",
            callbacks=[self._observe_slots],
            unit="1",
            description=METRIC_NAMES["treadle_worker_slots"],
        )

    # -- runs -------------------------------------------------------------------------------
    def run_started(self, workflow_id: str, count: int = 1) -> None:
        self.runs_started.add(count, {"workflow": workflow_id})

    def runs_ended(self, run_ids: Sequence[str], outcomes: Mapping[str, Run]) -> None:
        """A ``watch_run_ends`` callback: count the runs a commit of this process ended."""
        for run_id in run_ids:
            run = outcomes.get(run_id)
            if run is None:
                continue  # ended by a write this adapter does not describe (not counted)
            attributes = {"workflow": run.workflow_id}
            if run.status is RunStatus.COMPLETED:
                self.runs_completed.add(1, attributes)
            elif run.status is RunStatus.FAILED:
                self.runs_failed.add(1, attributes)
            elif run.status is RunStatus.CANCELLED:
                self.runs_cancelled.add(1, attributes)

    # -- attempts ---------------------------------------------------------------------------
    def attempt_ended(
        self, kind: str, workflow_id: str, name: str, outcome: str, seconds: float, retrying: bool
    ) -> None:
        if kind == "step":
            self.step_duration.record(
                seconds, {"workflow": workflow_id, "step": name, "outcome": outcome}
            )
        elif kind == "stage":
            self.stage_duration.record(
                seconds, {"workflow": workflow_id, "stage": name, "outcome": outcome}
            )
        if retrying:
            self.retries.add(1, {"workflow": workflow_id, "kind": kind})

    # -- the job path and the tick --------------------------------------------------------
    def job_claimed(self, job: Job, now: datetime) -> None:
        """A worker leased ``job`` (dequeued or chained): how long it waited since due."""
        due = max(job.next_poll_at, job.enqueued_at)
        leased = job.heartbeat_at or now
        self.claim_latency.record(max(0.0, (leased - due).total_seconds()), {"queue": job.queue})

    def leases_expired(self, count: int) -> None:
        self.lease_expiries.add(count)  # 0 too: the series exists from the first tick

    # -- worker slots ---------------------------------------------------------------------
    def watch_worker(self, worker: SlotHolder) -> None:
        """Report ``worker``'s slots until it is garbage (a weak reference)."""
        self._workers.add(worker)

    def unwatch_worker(self, worker: SlotHolder) -> None:
        self._workers.discard(worker)

    def _observe_busy(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(sum(w.in_flight for w in list(self._workers)))]

    def _observe_slots(self, options: CallbackOptions) -> Iterable[Observation]:
        running = [w for w in list(self._workers) if getattr(w, "running", True)]
        return [Observation(sum(w.concurrency for w in running))]


@dataclass
class _Snapshot:
    depths: list[tuple[str, str, int]] = field(default_factory=list)
    oldest: list[tuple[str, float]] = field(default_factory=list)
    outbox_lag: float | None = None
    dead_letters: int | None = None


class StorageGauges:
    """Queue depth, oldest waiting job, outbox lag and dead letters, read from storage.

    Observable callbacks run synchronously (on a scrape, in whatever thread the reader
    uses), while storage is async: ``await refresh()`` reads the values (the metrics
    endpoints call it before rendering), and the callbacks report the last reading."""

    def __init__(
        self,
        meter: Meter,
        persistence: Persistence,
        clock: Clock,
        workers: WorkerRegistry | None = None,
        queues: Iterable[str] = ("default",),
    ) -> None:
        self._persistence = persistence
        self.queues = set(queues)
        """Queues reported even when empty (a worker adds those it serves)."""
        self._clock = clock
        self._workers = workers
        self._last = _Snapshot()
        meter.create_observable_gauge(
            "treadle.queue.depth",
            callbacks=[self._observe_depth],
            unit="1",
            description=METRIC_NAMES["treadle_queue_depth"],
        )
        meter.create_observable_gauge(
            "treadle.queue.oldest_age",
            callbacks=[self._observe_oldest],
            unit="s",
            description=METRIC_NAMES["treadle_queue_oldest_age_seconds"],
        )
        meter.create_observable_gauge(
            "treadle.outbox.lag",
            callbacks=[self._observe_lag],
            unit="s",
            description=METRIC_NAMES["treadle_outbox_lag_seconds"],
        )
        meter.create_observable_gauge(
            "treadle.outbox.dead_letters",
            callbacks=[self._observe_dlq],
            unit="1",
            description=METRIC_NAMES["treadle_outbox_dead_letters"],
        )

    async def refresh(self) -> None:
        """Read the gauges' values: one queue-depth query (when the backend has a worker
        registry) and two bounded outbox reads."""
        now = self._clock.now()
        snap = _Snapshot()
        if self._workers is not None:
            depths = {d.queue: d for d in await self._workers.queue_depths(now)}
            for queue in self.queues:  # served queues report 0 rather than nothing
                depths.setdefault(queue, QueueDepth(queue=queue))
            for depth in depths.values():
                snap.depths.extend(
                    [
                        (depth.queue, "queued", depth.queued),
                        (depth.queue, "scheduled", depth.scheduled),
                        (depth.queue, "leased", depth.leased),
                    ]
                )
                age = 0.0
                if depth.oldest_due_at is not None:
                    age = max(0.0, (now - depth.oldest_due_at).total_seconds())
                snap.oldest.append((depth.queue, age))
        async with self._persistence.transaction() as tx:
            oldest = await tx.outbox.unpublished(1)
            dead = await tx.outbox.dead_lettered(DLQ_COUNT_CAP)
        snap.outbox_lag = (
            max(0.0, (now - oldest[0].event.timestamp).total_seconds()) if oldest else 0.0
        )
        snap.dead_letters = len(dead)
        self._last = snap

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"queue": q, "status": s}) for q, s, n in self._last.depths]

    def _observe_oldest(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(age, {"queue": q}) for q, age in self._last.oldest]

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        lag = self._last.outbox_lag
        return [] if lag is None else [Observation(lag)]

    def _observe_dlq(self, options: CallbackOptions) -> Iterable[Observation]:
        count = self._last.dead_letters
        return [] if count is None else [Observation(count)]
