"""``Worker``: the long-running host loop, shared by ``treadle worker`` and the
Engine's in-process worker.

Two loops share one kernel. The orchestration loop runs ``maintenance_tick``
every ``orchestration_interval`` (ticks never overlap); the job loop leases as
many jobs as there are free slots and runs each through ``execute_job``, so at
most ``concurrency`` stages execute at once. A slot whose stage's commit advances
the run keeps the run's next stage (``execute_job(chain=...)``: leased and started
in that commit) until the worker stops. A claim leases and starts the first stage of
as many claimed runs as there are free slots (``RunClaimPending.chain``) and hands
those jobs to the slots directly; once the queue was found empty, a freed slot goes
to such a claim instead of a dequeue. ``notify()`` wakes both loops: a
run started in this process is claimed and executed at once instead of at the
next tick. Timed work (a retry's backoff, a batch check, a durable sleep, a scheduled
command) wakes the loop that takes it when it falls due, whichever process wrote it
(``runtime/due.py``). A loop whose iteration fails (database unreachable) backs off
exponentially up to ``max_backoff`` and returns to its normal pace on the first
success. Signal handling belongs to the process host, not here, so the same
class runs inside an application's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from treadle.adapters.due_times import DueKind, DueTimes, parse_due
from treadle.adapters.logging import structlog_logger
from treadle.adapters.run_ends import RUN_END_PREFIX
from treadle.kernel.errors import describe_exception
from treadle.kernel.model import WorkerInfo
from treadle.kernel.registry import refuse_remote_queues
from treadle.runtime.backoff import Backoff
from treadle.runtime.due import DueSchedule, next_due_times
from treadle.runtime.jobs import execute_job, release_command, release_job
from treadle.runtime.options import WorkerOptions
from treadle.runtime.releases import ReleaseRetries
from treadle.runtime.tick import TickReport, TickStep, claim_step, due_steps, maintenance_tick

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from treadle.kernel.kernel import Kernel
    from treadle.kernel.model import Job
    from treadle.ports.wake_source import WakeSource
    from treadle.ports.workers import WorkerRegistry


_TICK_KINDS: tuple[DueKind, ...] = ("poll", "command", "schedule")
"""Timed work the orchestration loop takes (the tick's ``poll_suspended``,
``scheduled`` and ``schedules`` steps); ``job`` is the job loop's."""
_ANY_KIND: tuple[DueKind, ...] = ("job", "poll")
"""What an execution's ``next_poll_at`` may be: a job's backoff or a stage's next poll."""


RELEASE_GRACE = 2.0
"""Seconds a stopping worker keeps retrying failed releases past its drain deadline."""


BEAT_INTERVAL = 10.0
"""Seconds between a worker's beats into the worker registry at most (its liveness
window, ``engine.queues(live_within=60)``, spans several)."""


ANY_END_TTL = 60.0
"""Seconds a worker whose claim found a concurrency limit full asks PostgreSQL to NOTIFY
every run's end (``adapters/sql/wake_interest.py``); renewed while the limit stays full."""


class Worker:
    """Executes jobs and runs maintenance against ``kernel`` until stopped.

    ``async with Worker(kernel):`` or ``await worker.start()`` / ``await worker.aclose()``.
    """

    def __init__(
        self,
        kernel: Kernel,
        options: WorkerOptions | Mapping[str, Any] | None = None,
        *,
        logger: Any = None,
        wake_source: WakeSource | None = None,
        registry: WorkerRegistry | None = None,
        **overrides: Any,
    ) -> None:
        """``options`` and ``overrides`` (``concurrency=8``, ...): see ``WorkerOptions``,
        which checks them and names a bad one (``InvalidWorkerOptionsError``)."""
        self.options = opts = WorkerOptions.build(options, overrides)
        self.kernel = kernel
        self.worker_id = opts.worker_id
        self.concurrency = opts.concurrency
        self.orchestration_interval = opts.orchestration_interval
        self.job_poll_interval = opts.job_poll_interval
        self.stale_lease_threshold = opts.stale_lease_threshold
        self.stuck_threshold = opts.stuck_threshold
        self.heartbeat_interval = opts.heartbeat
        self.max_claims = opts.max_claims
        self.max_backoff = opts.max_backoff
        self.queues = opts.queues
        refuse_remote_queues(kernel.deps.registry, self.queues, f"worker {self.worker_id!r}")
        self.registry = registry
        self._started_at: datetime | None = None
        self._next_beat = 0.0
        self.log = (logger or structlog_logger("treadle.runtime")).bind(worker_id=self.worker_id)
        self.last_tick: TickReport | None = None
        self.last_tick_at: float | None = None
        """``time.monotonic()`` when the last full maintenance tick ended (health checks)."""
        self.ticks = 0
        self._tick_lock = asyncio.Lock()
        # Each loop sleeps on one event; a flag says whether it was set for work (a claim,
        # a dequeue) or only to re-arm the sleep for an earlier due time.
        self._claim_wake = asyncio.Event()
        self._claim_asked = False
        self._job_wake = asyncio.Event()
        self._job_asked = False
        self._stop_event = asyncio.Event()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._started = False
        # Wake-source hook (LISTEN/NOTIFY on PostgreSQL): pushes notify(); polling stays.
        self.wake_source = wake_source
        self._unsubscribe_wake: Callable[[], None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._drain_deadline = 0.0
        self._deadline_moved = asyncio.Event()
        # Slots held for the jobs a claim in progress may chain (not free to dequeue).
        self._reserved = 0
        # The last claim took all it asked for: more PENDING runs are probably waiting.
        self._claims_pending = False
        # Until then (monotonic), the job queue counts as drained: the last dequeue came
        # back short and no wake-up announced new jobs since.
        self._queue_empty_until = 0.0
        self._taken = 0  # chained jobs received from claims so far
        # A claim for free slots (``_claim_only``) took runs since the last full tick.
        self._claimed_since_tick = False
        # Releases that failed (storage down), retried with backoff until it answers.
        self._releases = ReleaseRetries(kernel, self.log)
        # Due times of timed work this worker knows (kernel clock), see ``runtime/due.py``.
        self._due = DueSchedule()
        self._unwatch_due: Callable[[], None] | None = None
        self._unwatch_ends: Callable[[], None] | None = None
        # Flow control: the last claim passed runs over (a limit was full). A run's end
        # may free a slot, so it asks for a claim; a rate window frees one at a known time.
        self._limits_full = False
        self._limits_timer: asyncio.TimerHandle | None = None
        # PostgreSQL NOTIFYs a run's end only to those who asked (``wake_interest``): a
        # worker waiting for a slot asks for every end, for ``ANY_END_TTL`` seconds.
        self._any_end_marked = -ANY_END_TTL
        self._marking: asyncio.Task[None] | None = None
        self._saturated = False  # the job loop waits for a slot to free

    # -- public surface ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._started and not self._stop_event.is_set()

    @property
    def loops_alive(self) -> bool:
        """Both loops are running (started, not stopped, neither task ended)."""
        return self.running and len(self._loops) == 2 and not any(t.done() for t in self._loops)

    @property
    def in_flight(self) -> int:
        """Jobs executing right now."""
        return len(self._in_flight)

    def notify(self) -> None:
        """New work may exist (a run was started, rerun or resumed in this process): claim
        and dequeue now instead of at the next interval. Cheap and safe to call often:
        wake-ups coalesce."""
        self._queue_empty_until = 0.0
        self._ask_claim()
        self._ask_jobs()

    def _ask_claim(self) -> None:
        """The orchestration loop should claim (or tick, if one is due) now."""
        self._claim_asked = True
        self._claim_wake.set()

    def _on_run_end(self) -> None:
        """A run ended (here or, through NOTIFY, elsewhere): when the last claim passed
        runs over for a full concurrency limit, the slot it freed may admit one."""
        if self._limits_full and not self._stop_event.is_set():
            self._ask_claim()

    def _note_claim(self, claim: Mapping[str, Any] | None) -> None:
        """Remember whether a claim passed runs over for a limit, and ask for a claim
        when a rate window frees a start (``retry_at``)."""
        if claim is None or "claimed" not in claim:
            return  # the step failed: keep what the last claim said
        self._limits_full = bool(claim.get("deferred"))
        if self._limits_full:
            self._ask_for_run_ends()
        retry_at = claim.get("retry_at")
        if retry_at is None or self._stop_event.is_set():
            return
        when = datetime.fromisoformat(retry_at) if isinstance(retry_at, str) else retry_at
        delay = max(0.0, (when - self.kernel.deps.clock.now()).total_seconds())
        if self._limits_timer is not None:
            self._limits_timer.cancel()
        self._limits_timer = asyncio.get_running_loop().call_later(delay, self._ask_claim)

    def _ask_for_run_ends(self) -> None:
        """A limit is full: on PostgreSQL, mark ``*`` so that every run's end is
        NOTIFYed (a run of another process may free the slot), then claim once more (a
        run that ended before the mark committed sent no NOTIFY). Renewed at most every
        half ``ANY_END_TTL``, while claims keep finding the limit full."""
        mark = getattr(self.kernel.deps.persistence, "mark_any_run_end", None)
        if mark is None or self.wake_source is None or self._stop_event.is_set():
            return
        if self._marking is not None or time.monotonic() - self._any_end_marked < ANY_END_TTL / 2:
            return

        async def marking() -> None:
            try:
                await mark(ANY_END_TTL)
                self._any_end_marked = time.monotonic()
                self._ask_claim()
            except Exception as exc:  # the full tick's claim still finds the free slot
                self.log.warning("worker.mark_run_ends_failed", error=describe_exception(exc))
            finally:
                self._marking = None

        self._marking = asyncio.get_running_loop().create_task(
            marking(), name=f"{self.worker_id}:mark-run-ends"
        )

    def _ask_jobs(self) -> None:
        """The job loop should dequeue now (if it has a free slot)."""
        self._job_asked = True
        self._job_wake.set()

    def _on_wake(self, kind: str) -> None:
        """Wake-source hook: queued jobs wake only the job loop (a claim would find
        nothing new); a new run only the orchestration loop (its claim leases the run's
        first stage to a free slot; a dequeue meanwhile would find nothing and compete
        with it); due times re-arm the loops' sleeps; an unknown cause (a reconnect's
        catch-up) wakes both loops."""
        if kind == "jobs":
            self._queue_empty_until = 0.0
            self._ask_jobs()
        elif kind == "run":
            self._ask_claim()
        elif (due := parse_due(kind)) is not None:
            self._note_times(due)
        elif kind.startswith(RUN_END_PREFIX):  # for result waiters, and freed slots
            self._on_run_end()
        else:
            self.notify()

    async def start(self) -> None:
        """Start both loops; returns at once. The first tick runs immediately."""
        if self._started:
            raise RuntimeError(f"worker {self.worker_id!r} was already started")
        self._started = True
        self._started_at = self.kernel.deps.clock.now()
        # Commits of this worker lease it only jobs of its queues (``Chains.serves``).
        self.kernel.deps.chains.serve(self.worker_id, self.queues)
        await self._beat()  # registered before it takes work: doctor never sees it unlisted
        if self.kernel.deps.telemetry is not None:
            self.kernel.deps.telemetry.watch_worker(self)  # treadle.worker.slots.*
        self.log.info("worker.started", concurrency=self.concurrency, queues=list(self.queues))
        self._loops = [
            asyncio.create_task(self._orchestration_loop(), name=f"{self.worker_id}:orchestration"),
            asyncio.create_task(self._job_loop(), name=f"{self.worker_id}:jobs"),
        ]
        if self.wake_source is not None:
            self._unsubscribe_wake = self.wake_source.subscribe(self._on_wake)
        watch = getattr(self.kernel.deps.persistence, "watch_due", None)
        if watch is not None:  # this process's commits tell it of the timed work they write
            self._unwatch_due = watch(self._note_times)
        watch_ends = getattr(self.kernel.deps.persistence, "watch_run_ends", None)
        if watch_ends is not None:  # this process's commits that end runs
            self._unwatch_ends = watch_ends(lambda _ids, _outcomes: self._on_run_end())

    async def aclose(self, drain_timeout: float | None = None) -> None:
        """Stop claiming and dequeuing, and return once in-flight work is over: running
        jobs get up to ``drain_timeout`` seconds to finish, the rest are cancelled and
        released (``release_job``) so another worker takes them at once, not after the
        stale-lease threshold. A call while a stop is in progress waits for that stop and
        can only shorten its deadline (``aclose(0)`` after a second SIGTERM). Idempotent.
        ``drain_timeout`` defaults to the worker's ``WorkerOptions.drain_timeout``."""
        if not self._started:
            return
        if drain_timeout is None:
            drain_timeout = self.options.drain_timeout
        deadline = time.monotonic() + max(drain_timeout, 0.0)
        if self._stopping is None:
            self._stop_event.set()
            # Stages finishing from now on chain nothing: a stopping worker starts no new work.
            self.kernel.deps.chains.stop(self.worker_id)
            if self._unsubscribe_wake is not None:
                self._unsubscribe_wake()
                self._unsubscribe_wake = None
            if self._unwatch_due is not None:
                self._unwatch_due()
                self._unwatch_due = None
            if self._unwatch_ends is not None:
                self._unwatch_ends()
                self._unwatch_ends = None
            if self._limits_timer is not None:
                self._limits_timer.cancel()
            self._claim_wake.set()
            self._job_wake.set()
            self._drain_deadline = deadline
            self._stopping = asyncio.create_task(self._shutdown(), name=f"{self.worker_id}:stop")
        elif deadline < self._drain_deadline:
            self._drain_deadline = deadline
            self._deadline_moved.set()
        # Shielded: a caller that gives up waiting does not abandon jobs half-released.
        await asyncio.shield(self._stopping)

    async def _shutdown(self) -> None:
        """Drain against ``_drain_deadline`` (which ``aclose`` may move earlier), then
        cancel what is left. The loops exit at their next wake-up, a tick in progress
        finishes first; in-flight jobs run meanwhile, against the same deadline."""
        if self._in_flight:
            self.log.info("worker.draining", jobs=len(self._in_flight))
        while pending := [t for t in (*self._loops, *self._in_flight) if not t.done()]:
            remaining = self._drain_deadline - time.monotonic()
            if remaining <= 0:
                break
            self._deadline_moved.clear()
            moved = asyncio.ensure_future(self._deadline_moved.wait())
            await asyncio.wait(
                [*pending, moved], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            moved.cancel()
        pending = [t for t in (*self._loops, *self._in_flight) if not t.done()]
        for task in pending:
            task.cancel()  # execute_job releases the job of a cancelled execution
        if pending:
            self.log.warning("worker.cancelled_tasks", count=len(pending))
            await asyncio.wait(pending)
        if self._releases.pending:
            # Jobs whose release failed: a last chance to hand them back before exiting
            # (past it, their leases expire and lease.reapStale frees them).
            grace = max(self._drain_deadline - time.monotonic(), RELEASE_GRACE)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._releases.wait_idle(), grace)
        await self._releases.aclose()
        await self._leave()
        self.log.info("worker.stopped")

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def tick(self) -> TickReport:
        """Run one full maintenance tick now (serialized with the loop's ticks).

        Its claim takes up to ``max_claims`` runs, those beyond the free slots queued
        for any worker; except while this worker's own claims keep up with its slots
        (a claim for free slots took runs since the last tick, and more wait): then the
        tick claims only what its free slots take, chained, and nothing when there are
        none. A run the tick queued would cost this same worker a dequeue and a
        phase-1 transaction later, where a chained claim starts it in the claim's
        commit; and the claims made as slots free take every waiting run in turn."""
        async with self._tick_lock:
            free = self._free_slots()
            chain = min(free, self.max_claims)
            keeping_up = self._claimed_since_tick and self._claims_pending
            self._claimed_since_tick = False
            max_claims = chain if keeping_up else self.max_claims
            self._reserved += chain
            taken = self._taken
            try:
                report = await maintenance_tick(
                    self.kernel,
                    worker_id=self.worker_id,
                    stale_threshold=self.stale_lease_threshold,
                    stuck_threshold=self.stuck_threshold,
                    max_claims=max(max_claims, 1),
                    logger=self.log,
                    chain=chain,
                    take=self._take_chained,
                    claim=max_claims > 0,
                )
            finally:
                self._release_held(chain, taken)
        if max_claims > 0:  # a tick that left its claim out leaves what the last one said
            self._claims_pending = report.claimed_runs >= max_claims
            self._note_claim(report.result("claim"))
        self.last_tick = report
        self.last_tick_at = time.monotonic()
        self.ticks += 1
        await self._refresh_due()
        return report

    # -- loops ------------------------------------------------------------------------
    async def _claim_only(self) -> TickReport:
        """A notify() wake-up claims without the rest of the tick: a burst of starts must
        not turn into a burst of reaper scans. It claims a run for every free slot, all
        chained, whatever ``max_claims`` (the full tick's claim) is: the slots of a busy
        worker free together, and one claim for all of them is one transaction instead
        of one per ``max_claims`` runs."""
        started = time.monotonic()
        async with self._tick_lock:
            free = self._free_slots()
            if free == 0:
                # Saturated: leave the runs PENDING (another worker may take them) until a
                # slot frees, when they are claimed with their first stage chained to it;
                # the full tick still claims every ``orchestration_interval``.
                self._claims_pending = True
                step = TickStep(result={"claimed": [], "chained_jobs": []}, duration=0.0)
                return TickReport(
                    worker_id=self.worker_id,
                    started_at=self.kernel.deps.clock.now(),
                    steps={"claim": step},
                )
            self._reserved += free
            taken = self._taken
            try:
                result = await claim_step(
                    self.kernel,
                    worker_id=self.worker_id,
                    max_claims=free,
                    chain=free,
                    take=self._take_chained,
                )
                step = TickStep(result=result, duration=time.monotonic() - started)
                claimed = len(result.get("claimed", ()))
                self._claims_pending = claimed >= free
                self._claimed_since_tick = self._claimed_since_tick or claimed > 0
                self._note_claim(result)
            except Exception as exc:
                self.log.error("worker.claim_failed", error=describe_exception(exc))
                step = TickStep(error=describe_exception(exc), duration=time.monotonic() - started)
                self._claims_pending = False
            finally:
                self._release_held(free, taken)
        return TickReport(
            worker_id=self.worker_id,
            started_at=self.kernel.deps.clock.now(),
            steps={"claim": step},
        )

    async def _orchestration_loop(self) -> None:
        backoff = Backoff(min(1.0, self.orchestration_interval), self.max_backoff)
        next_full = time.monotonic()
        while not self._stop_event.is_set():
            asked, self._claim_asked = self._claim_asked, False
            self._claim_wake.clear()
            full = time.monotonic() >= next_full
            # Taken off either way: a full tick polls and drains the scheduler too.
            due = self._due.take_due(_TICK_KINDS, self.kernel.deps.clock.now())
            try:
                if full:
                    report: TickReport | None = await self.tick()
                    if time.monotonic() >= self._next_beat:
                        await self._beat()
                elif due:
                    report = await self._due_step(due)
                elif asked:
                    report = await self._claim_only()
                else:
                    report = None  # woken early (a timer's rounding): sleep on
                failed = report is not None and report.all_failed
            except Exception as exc:  # maintenance_tick isolates steps; this is a bug guard
                self.log.error("worker.tick_crashed", error=describe_exception(exc))
                report, failed = None, True
            if self._stop_event.is_set():
                break
            if failed:
                # Probably the database is down: retry a full tick after a growing pause.
                delay = backoff.next()
                self.log.warning("worker.backing_off", loop="orchestration", delay=delay)
                next_full = time.monotonic() + delay
            else:
                backoff.reset()
                if full:
                    next_full = time.monotonic() + self.orchestration_interval
                # A due step asked for the jobs of the runs it resumed already, as its poll
                # returned (a second ask would cost an empty dequeue).
                resumed_asked = not full and bool(due)
                if report is not None and report.new_work and not resumed_asked:
                    self._ask_jobs()
                if report is not None and (
                    report.result("scheduled").get("dispatched")
                    or report.result("poll_suspended").get("timed_out_workflow_run_ids")
                    or (not full and report.result("schedules").get("fired"))
                ):
                    # A scheduled command (a run.create, a signal), a cron schedule's fire
                    # or a timed-out run may have left a PENDING run or queued jobs:
                    # claim and dequeue now.
                    self._ask_claim()
                    self._ask_jobs()
                if self._claims_pending and self._free_slots() > 0:
                    self._ask_claim()  # more PENDING runs are probably waiting
                if asked and resumed_asked:
                    self._ask_claim()  # asked while work fell due: the due step went first
            if failed:
                await _wait(self._stop_event, delay)  # notify() cannot cut a backoff short
            else:
                await self._sleep_orchestration(next_full)

    async def _beat(self) -> None:
        """Tell the worker registry this worker is alive and which queues it serves (at
        its start, then on full ticks at most every ``BEAT_INTERVAL``: a worker ticking
        every 50 ms must not add a write per tick, which on SQLite every other writer
        waits for). A failed beat only logs: liveness is for operators, not jobs."""
        if self.registry is None or self._started_at is None:
            return
        self._next_beat = time.monotonic() + BEAT_INTERVAL
        info = WorkerInfo(
            worker_id=self.worker_id,
            queues=self.queues,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at,
            heartbeat_at=self.kernel.deps.clock.now(),
        )
        try:
            await self.registry.beat(info)
        except Exception as exc:
            self.log.warning("worker.beat_failed", error=describe_exception(exc))

    async def _leave(self) -> None:
        if self.registry is None:
            return
        try:
            await self.registry.leave(self.worker_id)
        except Exception as exc:  # it ages out of the registry instead
            self.log.warning("worker.leave_failed", error=describe_exception(exc))

    async def _sleep_orchestration(self, next_full: float) -> None:
        """Until the next tick (``next_full``, monotonic), a claim is asked, or timed work
        of the tick's kinds falls due. A due time noted meanwhile re-arms the sleep."""
        while not self._claim_asked and not self._stop_event.is_set():
            until_tick = max(0.0, next_full - time.monotonic())
            if not await _wait(self._claim_wake, min(until_tick, self._due_in(_TICK_KINDS))):
                return  # the tick, or a due time
            self._claim_wake.clear()

    # -- timed work -------------------------------------------------------------------
    def note_due(self, when: datetime, kind: DueKind | None = None) -> None:
        """Timed work falls due at ``when`` (kernel clock). ``kind`` (``DueKind``) says
        which loop takes it: ``job`` the job loop's dequeue, ``poll`` and ``command`` the
        orchestration loop's due step. ``None`` (an execution's ``next_poll_at``: a retry
        backoff or a suspension, the result does not say which) wakes both then."""
        for k in (kind,) if kind is not None else _ANY_KIND:
            if self._due.add(k, when):
                # An earlier time than the loop sleeps until: re-arm its sleep (no work).
                (self._job_wake if k == "job" else self._claim_wake).set()

    def _note_times(self, due: DueTimes) -> None:
        """A commit (this process's, or another's through NOTIFY) wrote timed work."""
        for kind, when in due.items():
            self.note_due(when, kind)

    def _due_in(self, kinds: Iterable[DueKind]) -> float:
        """Seconds until the earliest known due time of ``kinds`` (``inf`` when none)."""
        when = self._due.earliest(kinds)
        if when is None:
            return float("inf")
        return max(0.0, (when - self.kernel.deps.clock.now()).total_seconds())

    async def _refresh_due(self) -> None:
        """Ask storage for the next due time of each kind (after a tick: other processes
        may have added timed work this worker was not told of)."""
        try:
            found = await next_due_times(self.kernel)
        except Exception as exc:  # the next tick tries again
            self.log.warning("worker.next_due_failed", error=describe_exception(exc))
            return
        now = self.kernel.deps.clock.now()
        # A time already past is left out: that work is due now, and the loops that take
        # it (a free slot's dequeue, the tick) already run.
        self._note_times({kind: when for kind, when in found.items() if when > now})

    async def _due_step(self, due: set[DueKind]) -> TickReport:
        """What fell due: suspended stages (batch checks, code-workflow timers) for
        ``poll``, scheduled commands for ``command``, cron schedules for ``schedule``. A
        resumed run's job is dequeued as soon as the poll returns (``on_resumed``), while
        its transition runs. A code workflow woken by its timer is leased to this worker
        in the firing commit and started there, up to the slots free when the step began
        (``_take_woken``): no dequeue, no phase-1 transaction. The slots are not held
        while the step runs (a batch check may call a slow external system meanwhile)."""
        started = self.kernel.deps.clock.now()
        async with self._tick_lock:
            free = self._free_slots() if "poll" in due else 0
            steps = await due_steps(
                self.kernel,
                worker_id=self.worker_id,
                logger=self.log,
                poll="poll" in due,
                scheduled="command" in due,
                schedules="schedule" in due,
                on_resumed=self._jobs_queued,
                chain=free,
                take=self._take_woken if free else None,
            )
        if self._unwatch_due is None:
            # No commit tells this worker of the timed work the step wrote (a check not
            # ready yet, a timer rescheduled): ask storage.
            await self._refresh_due()
        return TickReport(worker_id=self.worker_id, started_at=started, steps=steps)

    async def _job_loop(self) -> None:
        backoff = Backoff(min(1.0, self.job_poll_interval), self.max_backoff)
        while not self._stop_event.is_set():
            self._job_wake.clear()
            self._job_asked = False
            if self._due.take_due(("job",), self.kernel.deps.clock.now()):
                self._queue_empty_until = 0.0  # a retry's backoff ended: dequeue it now
            free = self._free_slots()
            if free <= 0:
                self._saturated = True
                try:
                    await self._job_wake.wait()  # set when a job finishes (or on stop)
                finally:
                    self._saturated = False
                continue
            try:
                jobs = await self.kernel.deps.job_transport.dequeue(
                    self.worker_id, self.kernel.deps.clock.now(), limit=free, queues=self.queues
                )
            except Exception as exc:
                delay = backoff.next()
                self.log.error(
                    "worker.dequeue_failed", error=describe_exception(exc), retry_in=delay
                )
                await _wait(self._stop_event, delay)
                continue
            backoff.reset()
            if len(jobs) < free:
                self._queue_empty_until = time.monotonic() + self.job_poll_interval
                if self._claims_pending:
                    self._ask_claim()  # the slots left free go to a chained claim
            if self._stop_event.is_set():
                # Stopped while dequeuing: hand these back rather than start new work.
                for job in jobs:
                    await self._release_unstarted(job)
                break
            for job in jobs:
                self._spawn(job)
            if jobs and len(jobs) == free:
                continue  # the queue may hold more; wait for a free slot above
            await self._sleep_jobs()

    async def _sleep_jobs(self) -> None:
        """Until the next poll, a dequeue is asked, or a queued job's backoff ends. A due
        time noted meanwhile re-arms the sleep."""
        while not self._job_asked and not self._stop_event.is_set():
            if not await _wait(self._job_wake, min(self.job_poll_interval, self._due_in(("job",)))):
                return  # the poll, or a job's due time
            self._job_wake.clear()

    def _spawn(self, job: Job) -> None:
        task = asyncio.create_task(
            execute_job(
                self.kernel,
                job,
                worker_id=self.worker_id,
                heartbeat_interval=self.heartbeat_interval,
                logger=self.log,
                chain=self._may_chain,
                stopping=self._stop_event.is_set,
                retries=self._releases,
                # Without commit notes (``watch_due``), the result says when it is due.
                on_due=self.note_due if self._unwatch_due is None else None,
                on_queued=self._jobs_queued,
            ),
            name=f"job:{job.id}",
        )
        self._in_flight.add(task)
        task.add_done_callback(self._job_done)

    def _free_slots(self) -> int:
        """Slots neither executing nor held for a claim in progress (none once stopping)."""
        if self._stop_event.is_set():
            return 0
        return max(0, self.concurrency - len(self._in_flight) - self._reserved)

    def _release_held(self, held: int, taken: int) -> None:
        """After a claim that held ``held`` slots: they are free again, and if the claim
        filled fewer (``self._taken`` counts the chained jobs taken since ``taken``), the
        job loop is woken to use the rest."""
        self._reserved -= held
        if self._taken - taken < held:
            self._ask_jobs()

    def _take_chained(self, jobs: list[Job]) -> None:
        """The jobs a claim leased to this worker and started: each takes a slot now (the
        claim held them), or is released if the worker stopped meanwhile."""
        self._taken += len(jobs)
        for job in jobs:
            if self._stop_event.is_set():
                task = asyncio.create_task(self._release_unstarted(job), name=f"release:{job.id}")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            else:
                self._spawn(job)

    def _take_woken(self, jobs: list[Job]) -> None:
        """The activations a due step's timer firing leased to this worker and started:
        each takes a free slot now. The step held no slots, so one that finds none free
        (filled meanwhile by a dequeue or an in-process start: rare) is handed back for
        any worker (``job.release``: its stage PENDING, its job queued), never run past
        ``concurrency``."""
        room = self._free_slots()
        self._take_chained(jobs[:room])
        for job in jobs[room:]:
            self.kernel.deps.chains.forget(job.id)
            release = self._release_unstarted(job, "woken with no free slot")
            task = asyncio.create_task(release, name=f"release:{job.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def lend_slot(self) -> SlotLoan | None:
        """Hold a free slot for a run started in this process (``run.create`` with
        ``claim_for``), or ``None`` when none is free (or the worker is not running).
        ``SlotLoan.settle`` hands over the job the start leased to this worker (or
        returns the slot)."""
        if not self.running or self._free_slots() <= 0:
            return None
        self._reserved += 1
        return SlotLoan(self, self._taken)

    def _jobs_queued(self) -> None:
        """This worker's commit queued jobs (a parallel group): dequeue them now."""
        self._queue_empty_until = 0.0
        self._ask_jobs()

    def _may_chain(self) -> bool:
        """A finished stage's slot takes its run's next stage directly (leased in the
        result's commit, no dequeue round trip) until the worker stops."""
        return not self._stop_event.is_set()

    async def _release_unstarted(self, job: Job, reason: str = "dequeued on stop") -> None:
        try:
            await release_job(self.kernel, job, worker_id=self.worker_id, reason=reason)
        except Exception as exc:  # storage down: retried until it answers (or we exit)
            self.log.error("worker.release_failed", job_id=job.id, error=describe_exception(exc))
            self._releases.add(release_command(job, self.worker_id, "interrupted", reason))

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._in_flight.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:  # execute_job swallows errors; this guards against its bugs
            self.log.error("worker.job_task_crashed", error=describe_exception(error))
        # A finished job frees a slot. Once the queue was found drained, and nothing
        # said otherwise since (a wake-up, this worker's own commit queuing jobs: both
        # end the drained state), the slot goes to a claim of a PENDING run (started in
        # the claim's commit) if one waits, and otherwise to nothing: a dequeue would
        # find nothing (one wasted transaction per run finished, for a worker running
        # runs one at a time). The drained state lasts one poll interval, so queued jobs
        # wait at most that. A loop waiting for a free slot is always woken.
        if self._saturated or time.monotonic() >= self._queue_empty_until:
            self._ask_jobs()
        elif self._claims_pending:
            self._ask_claim()


class SlotLoan:
    """A worker slot held for one in-process start; see ``Worker.lend_slot``."""

    __slots__ = ("_taken", "_worker")

    def __init__(self, worker: Worker, taken: int) -> None:
        self._worker = worker
        self._taken = taken

    @property
    def worker_id(self) -> str:
        return self._worker.worker_id

    def settle(self, job: Job | None) -> None:
        """Run ``job`` (leased to this worker and started by the start's commit) in the
        held slot; with ``None``, just give the slot back. Call exactly once."""
        worker = self._worker
        if job is not None:
            worker._take_chained([job])
        worker._release_held(1, self._taken)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Until ``event`` is set or ``seconds`` pass, whichever is first; true if it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
        return True
    return False
