"""The SQL schema, one ``MetaData`` for PostgreSQL and SQLite.

This module describes the tables the adapters query; the Alembic migrations in
``migrations/versions`` create them (and are checked against this description by
the integration tests, so the two cannot drift). No foreign keys tie the outbox,
jobs, logs or annotations to ``runs``: the ports let those rows exist for any run
id, and retention deletes them per table. Stages do reference their run, as the
port requires a run before its stages.

(No ``from __future__ import annotations`` here: it would shadow the ``annotations``
table name at type-check time.)
"""

import sqlalchemy as sa

from treadle.adapters.sql.types import Duration, UtcDateTime, big_id_type, json_type, key_type

VERSION_TABLE = "treadle_alembic_version"
"""Alembic's bookkeeping table; prefixed so an application's own Alembic history can share
the database."""

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", key_type(), primary_key=True),
    sa.Column("workflow_id", key_type(), nullable=False),
    sa.Column("workflow_version", sa.String(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input", json_type(), nullable=True),
    sa.Column("config", json_type(), nullable=False),
    sa.Column("output", json_type(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("idempotency_key", key_type(), nullable=True),
    sa.Column("parent_run_id", key_type(), nullable=True),
    sa.Column("search_attributes", json_type(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=True),
    sa.Column("completed_at", UtcDateTime(), nullable=True),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Column("worker_id", sa.String(), nullable=True),
    sa.Column("current_group", sa.Integer(), nullable=False),
    # run.pause / run.terminate (migration 0008).
    sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("terminated", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("concurrency_key", key_type(), nullable=True),
    # The W3C traceparent the run's spans join (migration 0012).
    sa.Column("trace_context", sa.String(), nullable=True),
    # One idempotent start per (workflow, key); NULL keys never collide on either dialect.
    sa.UniqueConstraint("workflow_id", "idempotency_key"),
    # claim_pending_runs: PENDING, priority desc, FIFO.
    sa.Index("ix_runs_claim", "status", sa.desc("priority"), "created_at", "id"),
    # runs_inactive_since (reapStuck).
    sa.Index("ix_runs_status_updated_at", "status", "updated_at"),
    # run.purge: terminal runs by the time they ended (0008).
    sa.Index("ix_runs_status_completed_at", "status", "completed_at"),
    # list_runs: newest first.
    sa.Index("ix_runs_created_at", "created_at", "id"),
    sa.Index("ix_runs_workflow_id_created_at", "workflow_id", "created_at"),
    sa.Index("ix_runs_parent_run_id", "parent_run_id"),
    # Flow control (kernel/flow_control.py): runs holding a slot per workflow and key, and
    # the starts within a rate window.
    sa.Index("ix_runs_flow", "workflow_id", "status", "concurrency_key"),
    sa.Index("ix_runs_workflow_id_started_at", "workflow_id", "started_at"),
    # list_runs(attributes=...) on PostgreSQL: ``search_attributes @> '{...}'``. Migration
    # 0003 creates it on PostgreSQL only (SQLite has no GIN; it scans the filtered rows).
    sa.Index(
        "ix_runs_search_attributes",
        "search_attributes",
        postgresql_using="gin",
        postgresql_ops={"search_attributes": "jsonb_path_ops"},
    ),
)

run_event_seq = sa.Table(
    "run_event_seq",
    metadata,
    # The last outbox sequence handed out per run. A row of its own (not a runs column)
    # because events may be appended for a run id before or without its run row.
    sa.Column("run_id", key_type(), primary_key=True),
    sa.Column("last_sequence", sa.BigInteger(), nullable=False),
)

stages = sa.Table(
    "stages",
    metadata,
    sa.Column(
        "run_id",
        key_type(),
        sa.ForeignKey("runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("stage_id", key_type(), primary_key=True),
    sa.Column("ordinal", sa.Integer(), nullable=False),
    sa.Column("execution_group", sa.Integer(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("output", json_type(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("retryable", sa.Boolean(), nullable=True),
    sa.Column("started_at", UtcDateTime(), nullable=True),
    sa.Column("completed_at", UtcDateTime(), nullable=True),
    sa.Column("suspended_state", json_type(), nullable=True),
    sa.Column("next_poll_at", UtcDateTime(), nullable=True),
    sa.Column("poll_interval", Duration(), nullable=True),
    sa.Column("suspend_deadline", UtcDateTime(), nullable=True),
    sa.Column("resume_state", json_type(), nullable=True),
    sa.Column("job_id", key_type(), nullable=True),
    sa.Column("check_failures", sa.Integer(), nullable=False, server_default="0"),
    # Where a failed attempt raised ``error`` (user frames only, bounded): migration 0006.
    sa.Column("error_traceback", sa.Text(), nullable=True),
    sa.Column("version", sa.Integer(), nullable=False),
    # due_suspended_stages: SUSPENDED by next_poll_at.
    sa.Index("ix_stages_status_next_poll_at", "status", "next_poll_at"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    # The enqueue order (Job.sequence) is the surrogate key: autoincrement on both dialects.
    sa.Column("seq", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("id", key_type(), nullable=False, unique=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("workflow_id", key_type(), nullable=False),
    sa.Column("stage_id", key_type(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    sa.Column("next_poll_at", UtcDateTime(), nullable=False),
    sa.Column("enqueued_at", UtcDateTime(), nullable=False),
    sa.Column("worker_id", sa.String(), nullable=True),
    sa.Column("heartbeat_at", UtcDateTime(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("queue", sa.String(64), nullable=False, server_default="default"),
    # dequeue: QUEUED on the worker's queue, priority desc, due first, FIFO.
    sa.Index("ix_jobs_dequeue", "status", "queue", sa.desc("priority"), "next_poll_at", "seq"),
    # stale_leases: LEASED by heartbeat.
    sa.Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
    sa.Index("ix_jobs_run_id", "run_id"),
    # Never reuse a deleted rowid: the sequence is an ordering guarantee.
    sqlite_autoincrement=True,
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("sequence", sa.BigInteger(), nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("event", json_type(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("published", sa.Boolean(), nullable=False),
    sa.Column("dead_lettered", sa.Boolean(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("published_at", UtcDateTime(), nullable=True),
    # After a failed publish: not tried again before this time (outbox.flush's backoff).
    sa.Column("retry_at", UtcDateTime(), nullable=True),
    # Per-run, gap-free order: also the read path of events_for_run.
    sa.UniqueConstraint("run_id", "sequence"),
    # unpublished_events / dead_lettered_events.
    sa.Index("ix_outbox_pending", "published", "dead_lettered", "id"),
    sqlite_autoincrement=True,
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("key", key_type(), primary_key=True),
    sa.Column("command_type", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("result", json_type(), nullable=True),
    sa.Column("started_at", UtcDateTime(), nullable=False),
)

logs = sa.Table(
    "logs",
    metadata,
    sa.Column("id", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("stage_id", key_type(), nullable=True),
    sa.Column("level", sa.String(16), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("fields", json_type(), nullable=False),
    sa.Column("timestamp", UtcDateTime(), nullable=False),
    sa.Index("ix_logs_run_id_id", "run_id", "id"),
)

annotations = sa.Table(
    "annotations",
    metadata,
    sa.Column("seq", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("id", key_type(), nullable=False, unique=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("attributes", json_type(), nullable=False),
    sa.Column("actor", sa.String(), nullable=True),
    sa.Column("scope", sa.String(), nullable=True),
    sa.Column("stage_id", key_type(), nullable=True),
    sa.Column("idempotency_key", key_type(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("run_id", "idempotency_key"),
    sa.Index("ix_annotations_run_id_seq", "run_id", "seq"),
)

blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("key", key_type(), primary_key=True),
    sa.Column("data", sa.LargeBinary(), nullable=False),
    sa.Column("size", sa.BigInteger(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

# -- code workflows (used by the durable-execution layer) --------------------------

journal = sa.Table(
    "journal",
    metadata,
    # One row per durable boundary of a code workflow, keyed by (step name, occurrence);
    # ``position`` is the order the body reached them, which replay checks for determinism.
    sa.Column("id", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("position", sa.Integer(), nullable=False),
    sa.Column("step_name", key_type(), nullable=False),
    sa.Column("occurrence", sa.Integer(), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("input", json_type(), nullable=True),
    sa.Column("result", json_type(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("idempotency_key", key_type(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("completed_at", UtcDateTime(), nullable=True),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.UniqueConstraint("run_id", "step_name", "occurrence"),
    sa.UniqueConstraint("run_id", "position"),
    # The entries a run waits on (a signal hand-over, a child's end look for them), without
    # walking the run's history: partial, so it holds only the few live waits (0005).
    sa.Index(
        "ix_journal_waiting",
        "run_id",
        "position",
        postgresql_where=sa.text("status = 'WAITING'"),
        sqlite_where=sa.text("status = 'WAITING'"),
    ),
)

signal_inbox = sa.Table(
    "signal_inbox",
    metadata,
    # Signals and updates delivered to a run, consumed in arrival order by name.
    sa.Column("id", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", key_type(), nullable=False),
    sa.Column("payload", json_type(), nullable=True),
    sa.Column("update_id", key_type(), nullable=True),
    sa.Column("reply", json_type(), nullable=True),
    sa.Column("idempotency_key", key_type(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("consumed_at", UtcDateTime(), nullable=True),
    sa.Column("consumed_by_step", key_type(), nullable=True),
    sa.UniqueConstraint("run_id", "idempotency_key"),
    sa.Index("ix_signal_inbox_run_id_name_id", "run_id", "name", "id"),
    # next_signal: the oldest unconsumed message of a name, however many were consumed
    # before it (0005).
    sa.Index(
        "ix_signal_inbox_unconsumed",
        "run_id",
        "name",
        "id",
        postgresql_where=sa.text("consumed_at IS NULL"),
        sqlite_where=sa.text("consumed_at IS NULL"),
    ),
)

timers = sa.Table(
    "timers",
    metadata,
    # Durable sleeps and wait timeouts: the maintenance tick fires the due ones.
    sa.Column("id", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("step_name", key_type(), nullable=False),
    sa.Column("occurrence", sa.Integer(), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("fire_at", UtcDateTime(), nullable=False),
    sa.Column("payload", json_type(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("fired_at", UtcDateTime(), nullable=True),
    sa.UniqueConstraint("run_id", "step_name", "occurrence"),
    sa.Index("ix_timers_fired_at_fire_at", "fired_at", "fire_at"),
    # pending_timers: a run's live timers, not the fired ones of every sleep before (0005).
    sa.Index(
        "ix_timers_live",
        "run_id",
        "fire_at",
        postgresql_where=sa.text("fired_at IS NULL"),
        sqlite_where=sa.text("fired_at IS NULL"),
    ),
)

# -- scheduler ---------------------------------------------------------------------

scheduled_commands = sa.Table(
    "scheduled_commands",
    metadata,
    # The Scheduler port: one pending command per key (scheduling a key again replaces it),
    # drained by the maintenance tick in ``run_at`` order.
    sa.Column("key", key_type(), primary_key=True),
    sa.Column("command", json_type(), nullable=False),
    sa.Column("run_at", UtcDateTime(), nullable=False),
    sa.Index("ix_scheduled_commands_run_at_key", "run_at", "key"),
)

# -- workers ---------------------------------------------------------------------------

workers = sa.Table(
    "workers",
    metadata,
    # The WorkerRegistry port: one row per worker process, refreshed on every
    # orchestration tick; doctor and engine.queues() read which queues have a live worker.
    sa.Column("worker_id", key_type(), primary_key=True),
    sa.Column("queues", json_type(), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("heartbeat_at", UtcDateTime(), nullable=False),
)

# -- wake-up interest (migration 0015, adapters/sql/wake_interest.py) -------------------

run_end_waiters = sa.Table(
    "run_end_waiters",
    metadata,
    # Runs someone in another process waits for (``RunHandle.result``), or ``*`` (any
    # run: a worker waiting for a concurrency slot). PostgreSQL's trigger on ``runs``
    # sends a run's ``end:<id>`` NOTIFY only when it finds a mark here.
    sa.Column("run_id", key_type(), primary_key=True),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
)

event_readers = sa.Table(
    "event_readers",
    metadata,
    # Live event-feed readers (the HTTP server's SSE hub), each for a TTL: commits that
    # append events send ``NOTIFY treadle_events`` only while one is live.
    sa.Column("reader_id", key_type(), primary_key=True),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
)

schedules = sa.Table(
    "schedules",
    metadata,
    # Durable cron schedules (adapters/sql/schedules.py): the whole schedule in ``data``,
    # the columns the tick's due query reads beside it.
    sa.Column("id", key_type(), primary_key=True),
    sa.Column("workflow_id", key_type(), nullable=False),
    sa.Column("paused", sa.Boolean(), nullable=False),
    sa.Column("next_fire_at", UtcDateTime(), nullable=True),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("data", json_type(), nullable=False),
    sa.Index("ix_schedules_due", "paused", "next_fire_at"),
)

ai_calls = sa.Table(
    "ai_calls",
    metadata,
    # Recorded AI calls (adapters/sql/ai_calls.py). ``cost_nanos``: the cost in units of
    # 1e-9 of ``currency``, an integer so sums are exact on both dialects. ``prompt`` and
    # ``response`` are payload columns (offloaded past the threshold, escaped).
    sa.Column("id", big_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", key_type(), nullable=False),
    sa.Column("workflow_id", key_type(), nullable=False),
    sa.Column("stage_id", key_type(), nullable=True),
    sa.Column("step", key_type(), nullable=True),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("topic", sa.String(), nullable=True),
    sa.Column("call_type", sa.String(32), nullable=False),
    sa.Column("provider", sa.String(), nullable=True),
    sa.Column("model", key_type(), nullable=False),
    sa.Column("prompt", json_type(), nullable=True),
    sa.Column("response", json_type(), nullable=True),
    sa.Column("input_tokens", sa.BigInteger(), nullable=False),
    sa.Column("output_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cost_nanos", sa.BigInteger(), nullable=True),
    sa.Column("currency", sa.String(8), nullable=False),
    sa.Column("latency", Duration(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("failed_attempt", sa.Boolean(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Index("ix_ai_calls_run_id_id", "run_id", "id"),
    sa.Index("ix_ai_calls_created_at", "created_at"),
)

ai_run_totals = sa.Table(
    "ai_run_totals",
    metadata,
    # Each run's AI totals and budget, updated in the transaction that records its calls.
    sa.Column("run_id", key_type(), primary_key=True),
    sa.Column("total_cost_nanos", sa.BigInteger(), nullable=False),
    sa.Column("input_tokens", sa.BigInteger(), nullable=False),
    sa.Column("output_tokens", sa.BigInteger(), nullable=False),
    sa.Column("calls", sa.Integer(), nullable=False),
    sa.Column("failed_calls", sa.Integer(), nullable=False),
    sa.Column("max_cost_nanos", sa.BigInteger(), nullable=True),
)

__all__ = [
    "VERSION_TABLE",
    "ai_calls",
    "ai_run_totals",
    "annotations",
    "blobs",
    "idempotency_keys",
    "jobs",
    "journal",
    "logs",
    "metadata",
    "outbox",
    "run_event_seq",
    "runs",
    "scheduled_commands",
    "schedules",
    "signal_inbox",
    "stages",
    "timers",
    "workers",
]
