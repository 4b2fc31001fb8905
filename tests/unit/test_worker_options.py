"""``WorkerOptions``: one model checks a worker's options for every host alike."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from treadle import Engine, InvalidWorkerOptionsError, TreadleValidationError, WorkerOptions
from treadle.hosts.aws_lambda import make_handler
from treadle.hosts.serverless import ServerlessHost
from treadle.hosts.worker import WorkerHost
from treadle.runtime.worker import Worker


def test_defaults_are_designs() -> None:
    """The defaults are DESIGN.md §7's: 10 s ticks, 1 s polls, 60 s stale leases."""
    opts = WorkerOptions()
    assert (opts.concurrency, opts.orchestration_interval, opts.job_poll_interval) == (8, 10, 1)
    assert opts.stale_lease_threshold == 60.0
    assert opts.heartbeat == 15.0
    assert opts.worker_id


def test_durations_take_timedelta_or_seconds() -> None:
    """A timedelta and a number of seconds are the same option."""
    a = WorkerOptions(worker_id="w", job_poll_interval=timedelta(milliseconds=50))
    b = WorkerOptions(worker_id="w", job_poll_interval=0.05)
    assert a == b


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"concurrency": 0}, "concurrency must be a positive integer, got 0"),
        ({"concurrency": True}, "concurrency must be a positive integer, got True"),
        ({"concurrency": 10_001}, "concurrency must be at most 10000"),
        ({"job_poll_interval": 0}, "job_poll_interval must be > 0 seconds"),
        ({"drain_timeout": -1}, "drain_timeout must be >= 0 seconds"),
        ({"stale_lease_threshold": float("inf")}, "stale_lease_threshold must be a finite"),
        ({"max_claims": 0}, "max_claims must be a positive integer"),
        ({"concurency": 4}, "concurency: unknown worker option"),
    ],
)
def test_a_bad_option_is_named(given: dict[str, Any], message: str) -> None:
    """A bad option fails with an error that names it: a validation error that is also a
    ValueError."""
    with pytest.raises(InvalidWorkerOptionsError, match=message) as info:
        WorkerOptions.build(given)
    assert isinstance(info.value, TreadleValidationError)
    assert isinstance(info.value, ValueError)
    assert info.value.errors[0][0] == next(iter(given))


async def test_every_host_refuses_the_same_bad_option() -> None:
    """Worker, Engine.worker, WorkerHost, ServerlessHost and the Lambda handler refuse a
    bad concurrency with the same message, before opening anything."""
    async with await Engine.open("memory://") as engine:
        attempts = [
            lambda: Worker(engine.kernel, concurrency=0),
            lambda: engine.worker(concurrency=0),
            lambda: WorkerHost([], db="memory://", concurrency=0),
            lambda: ServerlessHost(engine.kernel, concurrency=0),
            lambda: make_handler([], db="memory://", concurrency=0),
        ]
        for attempt in attempts:
            with pytest.raises(ValueError, match=r"^concurrency must be a positive integer, got 0"):
                attempt()


async def test_one_model_serves_every_host() -> None:
    """A WorkerOptions passed whole reaches the worker as given; keywords override it; a
    serverless host defaults to one job at a time."""
    opts = WorkerOptions(worker_id="w-1", concurrency=3, job_poll_interval=0.5)
    async with await Engine.open("memory://") as engine:
        worker = engine.worker(opts)
        assert (worker.worker_id, worker.concurrency, worker.job_poll_interval) == ("w-1", 3, 0.5)
        assert engine.worker(opts, concurrency=5).concurrency == 5
        assert WorkerHost([], db="memory://", options=opts).worker_id == "w-1"
        assert ServerlessHost(engine.kernel).concurrency == 1
        assert ServerlessHost(engine.kernel, opts).concurrency == 3
        assert make_handler([], db="memory://").options.concurrency == 1
