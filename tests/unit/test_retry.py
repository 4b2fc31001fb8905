"""RetryPolicy: delays, caps, jitter and which errors may retry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from treadle import NonRetryableError, RetryPolicy
from treadle.kernel.errors import (
    ConcurrencyError,
    InvalidInputError,
    OutputValidationError,
    TransientStorageError,
    describe_exception,
)


def test_exponential_delay_with_cap() -> None:
    """Delay grows by backoff per failed attempt and never exceeds max_delay."""
    policy = RetryPolicy(initial_delay=1.0, backoff=2.0, max_delay=timedelta(seconds=5))
    assert [policy.delay_for(n).total_seconds() for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]


def test_jitter_is_deterministic_per_seed() -> None:
    """Jitter comes from a hash of the seed: same seed same delay, within the band."""
    policy = RetryPolicy(initial_delay=10.0, jitter=0.5, max_delay=timedelta(seconds=100))
    a = policy.delay_for(1, seed="run:stage")
    assert a == policy.delay_for(1, seed="run:stage")
    assert timedelta(seconds=5) <= a <= timedelta(seconds=15)
    delays = {policy.delay_for(1, seed=f"s{i}") for i in range(10)}
    assert len(delays) > 1


def test_policy_validation() -> None:
    """Negative delays, max_delay below initial_delay and zero attempts are rejected."""
    with pytest.raises(ValidationError, match="negative"):
        RetryPolicy(initial_delay=-1.0)
    with pytest.raises(ValidationError, match="max_delay"):
        RetryPolicy(initial_delay=10.0, max_delay=timedelta(seconds=1))
    with pytest.raises(ValidationError):
        RetryPolicy(max_attempts=0)


def test_retryable_classification() -> None:
    """Plain errors and retryable Treadle errors retry; NonRetryable, validation and
    user-listed types do not."""

    class FatalError(Exception):
        pass

    policy = RetryPolicy(non_retryable=(FatalError,))
    assert policy.is_retryable(RuntimeError("x"))
    assert policy.is_retryable(TransientStorageError("x"))
    assert policy.is_retryable(ConcurrencyError("x"))
    assert not policy.is_retryable(NonRetryableError("x"))
    assert not policy.is_retryable(OutputValidationError("x"))
    assert not policy.is_retryable(InvalidInputError("x"))
    assert not policy.is_retryable(FatalError())


def test_allows_another_counts_attempts() -> None:
    """allows_another is false once max_attempts attempts have failed."""
    policy = RetryPolicy(max_attempts=2)
    assert policy.allows_another(1, RuntimeError())
    assert not policy.allows_another(2, RuntimeError())
    assert not policy.allows_another(1, NonRetryableError("no"))


def test_error_codes_and_description() -> None:
    """Every error's code is its class name; describe_exception gives 'Type: message'."""
    err = InvalidInputError("bad", [("input.x", "missing")])
    assert err.code == "InvalidInputError"
    assert err.errors == [("input.x", "missing")]
    assert describe_exception(RuntimeError("boom")) == "RuntimeError: boom"
    assert describe_exception(RuntimeError()) == "RuntimeError"
