"""Concurrency and rate limits: which PENDING runs a claim may start now.

A workflow may cap the runs that hold a slot at once (``concurrency``: all its runs;
``concurrency_per_key``: the runs sharing a ``concurrency_key``) and the runs it starts
per period (``rate_limit``). A run holds its slot from its claim (PENDING to RUNNING) to
its end, waits included: a suspended run resumes without a new claim, so releasing its
slot while it waits could let more runs in than the limit.

Limits gate ``run.claimPending`` only, so every host (worker, serverless, Lambda tick,
``TestEngine``) gets them. A run over a limit stays PENDING, in its place in the order,
and the claim passes over it to other runs. This module is the pure decision; storage
counts the usage under a lock per key (``ports.flow_control``), so that claimers in many
processes never admit more than the limit between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from treadle.kernel.limits import to_duration
from treadle.kernel.model import Run

FlowKey = tuple[str, str | None]
"""``(workflow_id, concurrency_key)``; a ``None`` key counts every run of the workflow."""


class RateLimit(BaseModel):
    """At most ``starts`` runs started per ``per`` (a sliding window; a number means
    seconds); with ``per_key``, per ``concurrency_key`` instead of per workflow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    starts: int = Field(gt=0, le=1_000_000)
    per: timedelta
    per_key: bool = False

    def __init__(self, starts: int, per: timedelta | float, per_key: bool = False) -> None:
        super().__init__(starts=starts, per=per, per_key=per_key)

    @field_validator("per", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        return to_duration(value, "per")


class LimitedWorkflow(Protocol):
    """What the decision reads of a workflow definition (``kernel.definitions`` imports
    this module, so it names the definition by the fields it uses)."""

    @property
    def id(self) -> str: ...

    @property
    def concurrency(self) -> int | None: ...

    @property
    def concurrency_per_key(self) -> int | None: ...

    @property
    def rate_limit(self) -> RateLimit | None: ...


@dataclass(frozen=True)
class Usage:
    """What storage counted for one key: runs holding a slot, and the starts within the
    rate window with the oldest of them."""

    active: int = 0
    started: int = 0
    oldest_start: datetime | None = None


@dataclass
class Admission:
    """A claim's verdict: the runs to start, in order; how many were passed over; the
    earliest time a rate window frees a start (``None``: only a run's end frees one)."""

    admitted: list[Run] = field(default_factory=list)
    blocked: set[FlowKey] = field(default_factory=set)
    deferred: int = 0
    retry_at: datetime | None = None


def check_limits(
    owner: str, concurrency: object, concurrency_per_key: object, rate_limit: object
) -> None:
    """``ValueError`` naming ``owner`` and the argument when a limit is not a positive
    integer or a ``RateLimit``."""
    for name, value in (("concurrency", concurrency), ("concurrency_per_key", concurrency_per_key)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):
        raise ValueError(
            f"{owner}: rate_limit must be a RateLimit(starts, per=...), got {rate_limit!r}"
        )


def keys_of_run(workflow_id: str, concurrency_key: str | None) -> list[FlowKey]:
    """Every key a run holding a slot counts towards: its workflow's, and its own
    concurrency key's if it has one (storage counts usage with it)."""
    if concurrency_key is None:
        return [(workflow_id, None)]
    return [(workflow_id, None), (workflow_id, concurrency_key)]


def tally(
    keys: Sequence[FlowKey],
    active: Mapping[FlowKey, int],
    starts: Mapping[FlowKey, Sequence[datetime]],
) -> dict[FlowKey, Usage]:
    """The ``Usage`` of each key from what storage counted: runs holding a slot, and the
    start times inside its rate window."""
    return {
        key: Usage(
            active=active.get(key, 0),
            started=len(starts.get(key, ())),
            oldest_start=min(starts[key]) if starts.get(key) else None,
        )
        for key in keys
    }


def limited(wf: LimitedWorkflow) -> bool:
    return (
        wf.concurrency is not None
        or wf.concurrency_per_key is not None
        or wf.rate_limit is not None
    )


def keys_of(wf: LimitedWorkflow, run: Run) -> list[FlowKey]:
    """The keys whose usage decides whether ``run`` may start."""
    keys: list[FlowKey] = []
    if wf.concurrency is not None or (wf.rate_limit is not None and not wf.rate_limit.per_key):
        keys.append((wf.id, None))
    keyed = wf.concurrency_per_key is not None or (
        wf.rate_limit is not None and wf.rate_limit.per_key
    )
    if keyed and run.concurrency_key is not None:
        keys.append((wf.id, run.concurrency_key))
    return keys


def windows(
    workflows: Mapping[str, LimitedWorkflow], keys: Iterable[FlowKey], now: datetime
) -> dict[FlowKey, datetime]:
    """For each key under a rate limit, the start of its window at ``now``."""
    out: dict[FlowKey, datetime] = {}
    for key in keys:
        rate = workflows[key[0]].rate_limit
        if rate is not None and (key[1] is not None) == rate.per_key:
            out[key] = now - rate.per
    return out


def admit(
    candidates: Sequence[tuple[Run, LimitedWorkflow | None]],
    usage: Mapping[FlowKey, Usage],
    room: int,
) -> Admission:
    """Admit ``candidates`` in order while their keys have room, at most ``room`` runs.

    A run is admitted only if every one of its keys has room, counting the runs this same
    claim admitted before it; otherwise it is deferred and its blocking key is recorded,
    so the next pass of the claim skips that key's runs instead of meeting them again."""
    verdict = Admission()
    active = {key: u.active for key, u in usage.items()}
    started = {key: u.started for key, u in usage.items()}
    for run, wf in candidates:
        if len(verdict.admitted) >= room:
            break
        if wf is None or not limited(wf):
            verdict.admitted.append(run)
            continue
        keys = keys_of(wf, run)
        blocking = [key for key in keys if not _room(wf, key, active, started)]
        if blocking:
            verdict.deferred += 1
            verdict.blocked.update(blocking)
            for key in blocking:
                _note_retry(verdict, wf, key, usage.get(key))
            continue
        for key in keys:
            active[key] = active.get(key, 0) + 1
            started[key] = started.get(key, 0) + 1
        verdict.admitted.append(run)
    return verdict


def _room(
    wf: LimitedWorkflow,
    key: FlowKey,
    active: Mapping[FlowKey, int],
    started: Mapping[FlowKey, int],
) -> bool:
    per_key = key[1] is not None
    cap = wf.concurrency_per_key if per_key else wf.concurrency
    if cap is not None and active.get(key, 0) >= cap:
        return False
    rate = wf.rate_limit
    return not (rate is not None and rate.per_key == per_key and started.get(key, 0) >= rate.starts)


def _note_retry(verdict: Admission, wf: LimitedWorkflow, key: FlowKey, usage: Usage | None) -> None:
    """A rate-limited key frees a start when its oldest start leaves the window."""
    rate = wf.rate_limit
    if rate is None or usage is None or usage.oldest_start is None:
        return
    if rate.per_key != (key[1] is not None) or usage.started < rate.starts:
        return
    at = usage.oldest_start + rate.per
    if verdict.retry_at is None or at < verdict.retry_at:
        verdict.retry_at = at
