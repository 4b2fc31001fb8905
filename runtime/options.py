"""``WorkerOptions``: what a worker is told, stated and checked in one place.

``treadle worker``, ``hosts.worker.WorkerHost``, ``Engine.worker(...)``, the runtime
``Worker``, ``ServerlessHost`` and the Lambda handler all take these options, as one
model or as the keyword arguments DESIGN.md §7 names (``worker_id``, ``concurrency``,
``orchestration_interval``, ``job_poll_interval``, ``stale_lease_threshold``, ...). Each
host builds them with ``WorkerOptions.build`` so a bad value is refused once, the same
way everywhere, with an error naming the option, before anything is opened or written.
A host that has no use for an option (a serverless host has no poll loop) ignores it.

Durations are seconds (a number or a ``timedelta``), stored as ``float`` seconds since
the loops sleep in seconds; each is finite and at most ``MAX_SECONDS``.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from treadle.kernel.errors import TreadleValidationError
from treadle.kernel.queues import DEFAULT_QUEUE, check_queues

MAX_SECONDS = 1e9
"""The longest duration option (about 31 years): a longer one, or ``inf``, would overflow
the ``timedelta`` that the maintenance tick takes from today's date, and crash every tick."""

MAX_CONCURRENCY = 10_000
"""The most stages one worker executes at once (each holds a task and a connection share)."""


def default_worker_id() -> str:
    """``host:pid:random``: unique per worker, readable in logs and in ``runs.worker_id``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class InvalidWorkerOptionsError(TreadleValidationError, ValueError):
    """A worker option is out of range or of the wrong type; the message names it.

    Also a ``ValueError``: hosts (and callers from before the model existed) catch that."""


def _seconds(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value > MAX_SECONDS:
        raise ValueError(
            f"{name} must be a finite number of seconds up to {MAX_SECONDS:g}, got {value!r}"
        )
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} seconds, got {value!r}")
    return float(value)


class WorkerOptions(BaseModel):
    """The options of one worker (see the module docstring); frozen, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    worker_id: str = Field(
        default_factory=default_worker_id,
        description="Name in logs and leases (default host:pid:random).",
    )
    concurrency: int = Field(default=8, description="Stages executing at once.")
    orchestration_interval: float = Field(
        default=10.0, description="Seconds between maintenance ticks."
    )
    job_poll_interval: float = Field(
        default=1.0, description="Seconds between job queue polls when idle."
    )
    stale_lease_threshold: float = Field(
        default=60.0, description="Seconds without heartbeat before a job is reaped."
    )
    stuck_threshold: float = Field(
        default=1800.0, description="Seconds without activity before a RUNNING run is reaped."
    )
    heartbeat_interval: float | None = Field(
        default=None,
        description="Seconds between lease extensions (default a quarter of the stale threshold).",
    )
    max_claims: int = Field(default=10, description="PENDING runs one claim takes at most.")
    max_backoff: float = Field(
        default=30.0, description="Longest pause of a loop whose storage keeps failing."
    )
    drain_timeout: float = Field(
        default=30.0, description="Seconds in-flight stages get to finish on stop (SIGTERM)."
    )
    queues: tuple[str, ...] = Field(
        default=(DEFAULT_QUEUE,),
        description="Named queues whose jobs the worker takes (docs/queues.md).",
    )

    _POSITIVE: ClassVar[tuple[str, ...]] = (
        "orchestration_interval",
        "job_poll_interval",
        "stale_lease_threshold",
        "stuck_threshold",
        "heartbeat_interval",
        "max_backoff",
    )

    @field_validator("worker_id", mode="before")
    @classmethod
    def _worker_id(cls, value: Any) -> Any:
        if value is None or value == "":
            return default_worker_id()
        if not isinstance(value, str):
            raise ValueError(f"worker_id must be a string, got {value!r}")
        return value

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"concurrency must be a positive integer, got {value!r}")
        if value > MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be at most {MAX_CONCURRENCY}, got {value!r}")
        return value

    @field_validator("max_claims", mode="before")
    @classmethod
    def _max_claims(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_claims must be a positive integer, got {value!r}")
        return value

    @field_validator(*_POSITIVE, mode="before")
    @classmethod
    def _positive_seconds(cls, value: Any, info: Any) -> float | None:
        if value is None and info.field_name == "heartbeat_interval":
            return None
        return _seconds(info.field_name, value, positive=True)

    @field_validator("queues", mode="before")
    @classmethod
    def _queues(cls, value: Any) -> tuple[str, ...]:
        if value is None or isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise ValueError(f"queues must be a list of queue names, got {value!r}")
        return check_queues(value, "queues")

    @field_validator("drain_timeout", mode="before")
    @classmethod
    def _drain_timeout(cls, value: Any) -> float:
        return _seconds("drain_timeout", value, positive=False)

    @property
    def heartbeat(self) -> float:
        """Seconds between lease extensions: ``heartbeat_interval``, or a quarter of the
        stale-lease threshold so a slow beat or two never loses the lease."""
        if self.heartbeat_interval is not None:
            return self.heartbeat_interval
        return self.stale_lease_threshold / 4

    @classmethod
    def build(
        cls,
        options: WorkerOptions | Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
    ) -> WorkerOptions:
        """``options`` (a model or a mapping) with ``overrides`` applied, over ``defaults``
        (a host's own, e.g. a serverless host runs one job at a time): the one place every
        host turns what it was given into options. Raises ``InvalidWorkerOptionsError``
        naming each bad option."""
        if options is not None and not isinstance(options, WorkerOptions | Mapping):
            raise InvalidWorkerOptionsError(
                f"options must be WorkerOptions or a mapping, got {type(options).__name__}",
                [("options", "wrong type")],
            )
        if isinstance(options, WorkerOptions) and not overrides:
            return options
        given: dict[str, Any] = dict(defaults or {})
        if isinstance(options, WorkerOptions):
            given.update(options.model_dump(exclude_unset=True), worker_id=options.worker_id)
        elif options is not None:
            given.update(options)
        given.update(overrides or {})
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            raise _options_error(exc) from None


def _options_error(exc: ValidationError) -> InvalidWorkerOptionsError:
    """One message naming each bad option: the validator's own sentence where there is
    one (it starts with the option's name), else ``name: problem``."""
    errors: list[tuple[str, str]] = []
    lines: list[str] = []
    for err in exc.errors():
        name = ".".join(str(part) for part in err.get("loc", ())) or "options"
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ValueError):
            text = str(cause)
            lines.append(text)
        elif err.get("type") == "extra_forbidden":
            text = "unknown worker option"
            lines.append(f"{name}: {text} (known: {', '.join(WorkerOptions.model_fields)})")
        else:
            text = str(err.get("msg", "invalid"))
            lines.append(f"{name}: {text}")
        errors.append((name, text))
    return InvalidWorkerOptionsError("; ".join(lines), errors)
