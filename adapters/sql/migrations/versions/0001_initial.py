"""Initial schema: runs, stages, jobs, outbox, idempotency, logs, annotations, blobs,
and the journal / signal inbox / timers tables of code workflows.

Types are spelled out here (not imported from ``schema``) so this revision keeps
creating exactly the same tables whatever later code does; the integration tests
compare the migrated database with ``schema.metadata``.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key() -> sa.types.TypeEngine[str]:
    return sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", _key(), nullable=False),
        sa.Column("workflow_id", _key(), nullable=False),
        sa.Column("workflow_version", sa.String(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input", _json(), nullable=True),
        sa.Column("config", _json(), nullable=False),
        sa.Column("output", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", _key(), nullable=True),
        sa.Column("parent_run_id", _key(), nullable=True),
        sa.Column("search_attributes", _json(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("completed_at", _ts(), nullable=True),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=True),
        sa.Column("current_group", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.UniqueConstraint(
            "workflow_id", "idempotency_key", name="uq_runs_workflow_id_idempotency_key"
        ),
    )
    op.create_index(
        "ix_runs_claim", "runs", ["status", sa.text("priority DESC"), "created_at", "id"]
    )
    op.create_index("ix_runs_status_updated_at", "runs", ["status", "updated_at"])
    op.create_index("ix_runs_created_at", "runs", ["created_at", "id"])
    op.create_index("ix_runs_workflow_id_created_at", "runs", ["workflow_id", "created_at"])
    op.create_index("ix_runs_parent_run_id", "runs", ["parent_run_id"])

    op.create_table(
        "run_event_seq",
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_run_event_seq"),
    )

    op.create_table(
        "stages",
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("stage_id", _key(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("execution_group", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("output", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("retryable", sa.Boolean(), nullable=True),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("completed_at", _ts(), nullable=True),
        sa.Column("suspended_state", _json(), nullable=True),
        sa.Column("next_poll_at", _ts(), nullable=True),
        sa.Column("poll_interval", sa.BigInteger(), nullable=True),
        sa.Column("suspend_deadline", _ts(), nullable=True),
        sa.Column("resume_state", _json(), nullable=True),
        sa.Column("job_id", _key(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_stages_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "stage_id", name="pk_stages"),
    )
    op.create_index("ix_stages_status_next_poll_at", "stages", ["status", "next_poll_at"])

    op.create_table(
        "jobs",
        sa.Column("seq", _big_id(), autoincrement=True, nullable=False),
        sa.Column("id", _key(), nullable=False),
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("workflow_id", _key(), nullable=False),
        sa.Column("stage_id", _key(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_poll_at", _ts(), nullable=False),
        sa.Column("enqueued_at", _ts(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=True),
        sa.Column("heartbeat_at", _ts(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_jobs"),
        sa.UniqueConstraint("id", name="uq_jobs_id"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_jobs_dequeue", "jobs", ["status", sa.text("priority DESC"), "next_poll_at", "seq"]
    )
    op.create_index("ix_jobs_status_heartbeat_at", "jobs", ["status", "heartbeat_at"])
    op.create_index("ix_jobs_run_id", "jobs", ["run_id"])

    op.create_table(
        "outbox",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("event", _json(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("published", sa.Boolean(), nullable=False),
        sa.Column("dead_lettered", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("published_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("run_id", "sequence", name="uq_outbox_run_id_sequence"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_outbox_pending", "outbox", ["published", "dead_lettered", "id"])

    op.create_table(
        "idempotency_keys",
        sa.Column("key", _key(), nullable=False),
        sa.Column("command_type", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", _json(), nullable=True),
        sa.Column("started_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("key", "command_type", name="pk_idempotency_keys"),
    )

    op.create_table(
        "logs",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("stage_id", _key(), nullable=True),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("fields", _json(), nullable=False),
        sa.Column("timestamp", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_logs"),
    )
    op.create_index("ix_logs_run_id_id", "logs", ["run_id", "id"])

    op.create_table(
        "annotations",
        sa.Column("seq", _big_id(), autoincrement=True, nullable=False),
        sa.Column("id", _key(), nullable=False),
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("attributes", _json(), nullable=False),
        sa.Column("actor", sa.String(), nullable=True),
        sa.Column("scope", sa.String(), nullable=True),
        sa.Column("stage_id", _key(), nullable=True),
        sa.Column("idempotency_key", _key(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_annotations"),
        sa.UniqueConstraint("id", name="uq_annotations_id"),
        sa.UniqueConstraint(
            "run_id", "idempotency_key", name="uq_annotations_run_id_idempotency_key"
        ),
    )
    op.create_index("ix_annotations_run_id_seq", "annotations", ["run_id", "seq"])

    op.create_table(
        "blobs",
        sa.Column("key", _key(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_blobs"),
    )

    op.create_table(
        "journal",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("step_name", _key(), nullable=False),
        sa.Column("occurrence", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("input", _json(), nullable=True),
        sa.Column("result", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", _key(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("completed_at", _ts(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_journal"),
        sa.UniqueConstraint(
            "run_id", "step_name", "occurrence", name="uq_journal_run_id_step_name_occurrence"
        ),
        sa.UniqueConstraint("run_id", "position", name="uq_journal_run_id_position"),
    )

    op.create_table(
        "signal_inbox",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", _key(), nullable=False),
        sa.Column("payload", _json(), nullable=True),
        sa.Column("update_id", _key(), nullable=True),
        sa.Column("reply", _json(), nullable=True),
        sa.Column("idempotency_key", _key(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("consumed_at", _ts(), nullable=True),
        sa.Column("consumed_by_step", _key(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_signal_inbox"),
        sa.UniqueConstraint(
            "run_id", "idempotency_key", name="uq_signal_inbox_run_id_idempotency_key"
        ),
    )
    op.create_index("ix_signal_inbox_run_id_name_id", "signal_inbox", ["run_id", "name", "id"])

    op.create_table(
        "timers",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("run_id", _key(), nullable=False),
        sa.Column("step_name", _key(), nullable=False),
        sa.Column("occurrence", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("fire_at", _ts(), nullable=False),
        sa.Column("payload", _json(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("fired_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_timers"),
        sa.UniqueConstraint(
            "run_id", "step_name", "occurrence", name="uq_timers_run_id_step_name_occurrence"
        ),
    )
    op.create_index("ix_timers_fired_at_fire_at", "timers", ["fired_at", "fire_at"])


def downgrade() -> None:
    for table in (
        "timers",
        "signal_inbox",
        "journal",
        "blobs",
        "annotations",
        "logs",
        "idempotency_keys",
        "outbox",
        "jobs",
        "stages",
        "run_event_seq",
        "runs",
    ):
        op.drop_table(table)
