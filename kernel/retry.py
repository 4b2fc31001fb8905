"""Retry policy: how many attempts, how long between them, which errors never retry.

The delay is a pure function of the policy, the attempt number and a seed
(the run and stage ids), so every adapter and every replay computes the same
backoff; jitter is derived from a hash of the seed, never from ambient randomness.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

from treadle.kernel.errors import NonRetryableError, TreadleError
from treadle.kernel.limits import Duration


class RetryPolicy(BaseModel):
    """``RetryPolicy(max_attempts=3, initial_delay=1.0, backoff=2.0)``; numbers are seconds."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    max_attempts: int = Field(default=3, ge=1)
    initial_delay: Duration = timedelta(seconds=1)
    backoff: float = Field(default=2.0, ge=1.0, allow_inf_nan=False)
    max_delay: Duration = timedelta(minutes=5)
    jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    non_retryable: tuple[type[BaseException], ...] = ()

    @model_validator(mode="after")
    def _delays_are_sane(self) -> RetryPolicy:
        if self.initial_delay < timedelta(0):
            raise ValueError("initial_delay must not be negative")
        if self.max_delay < self.initial_delay:
            raise ValueError("max_delay must be at least initial_delay")
        return self

    def delay_for(self, failed_attempt: int, seed: str = "") -> timedelta:
        """Delay before the attempt after ``failed_attempt`` (1-based)."""
        base = self.initial_delay.total_seconds() * self.backoff ** max(failed_attempt - 1, 0)
        base = min(base, self.max_delay.total_seconds())
        if self.jitter:
            digest = hashlib.blake2b(f"{seed}:{failed_attempt}".encode(), digest_size=8).digest()
            unit = int.from_bytes(digest, "big") / 2**64  # in [0, 1)
            base *= 1.0 + self.jitter * (2.0 * unit - 1.0)
        return timedelta(seconds=max(base, 0.0))

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether the error type allows another attempt (attempt counts are checked apart)."""
        if isinstance(exc, NonRetryableError):
            return False
        if self.non_retryable and isinstance(exc, self.non_retryable):
            return False
        # Validation, definition and state errors do not heal by waiting.
        return not (isinstance(exc, TreadleError) and not exc.retryable)

    def delay_after(self, failed_attempt: int, exc: BaseException, seed: str = "") -> timedelta:
        """``delay_for``, but at least the ``retry_after`` seconds the error asks for (a
        provider's 429 with ``Retry-After``: ``AIRateLimitedError``)."""
        delay = self.delay_for(failed_attempt, seed)
        asked = getattr(exc, "retry_after", None)
        if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > 0:
            delay = max(delay, timedelta(seconds=min(float(asked), 7 * 86_400)))
        return delay

    def allows_another(self, failed_attempt: int, exc: BaseException) -> bool:
        return failed_attempt < self.max_attempts and self.is_retryable(exc)


DEFAULT_RETRY = RetryPolicy()
