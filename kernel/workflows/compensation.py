"""The authoring side of sagas: ``Compensation`` (one registered undo) and ``Saga``
(what ``ctx.saga()`` returns). Running the compensations and queueing a cancelled run's
compensating activation live in ``saga``, above the context that registers them.

Below ``WorkflowContext``: a ``Saga`` needs of its context only ``register_compensation``
(``CompensationRegistry``), so the context imports this module and not the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from treadle.kernel.limits import to_duration
from treadle.kernel.retry import RetryPolicy


class CompensationRegistry(Protocol):
    """What a ``Saga`` registers its compensations with (a ``WorkflowContext``)."""

    def register_compensation(self, compensation: Compensation) -> None: ...


@dataclass(frozen=True)
class Compensation:
    """One registered compensation: call ``fn(*args)`` to undo a step that succeeded."""

    name: str
    fn: Callable[..., Any] = field(repr=False)
    args: tuple[Any, ...] = field(default=(), repr=False)
    retry: RetryPolicy | None = None
    timeout: timedelta | float | None = None


class Saga:
    """Returned by ``ctx.saga()``. Every saga of a run adds to the run's one stack of
    compensations, which runs newest first if the run fails or is cancelled."""

    def __init__(self, ctx: CompensationRegistry) -> None:
        self._ctx = ctx

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
    ) -> None:
        """Register ``fn(*args)`` (sync or async) as the compensation ``name``; call it
        right after the step it undoes succeeded. Journaled (kind ``compensation``), and
        committed with the body's next durable boundary. ``retry`` and ``timeout`` work as
        for ``ctx.step`` (default: the step retry policy)."""
        if not callable(fn):
            raise TypeError(f"saga.add({name!r}): fn must be callable, got {fn!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"saga.add({name!r}): retry must be a RetryPolicy, got {retry!r}")
        if timeout is not None:
            try:
                to_duration(timeout, "timeout")
            except ValueError as exc:
                raise ValueError(f"saga.add({name!r}): {exc}") from None
        self._ctx.register_compensation(Compensation(name, fn, tuple(args), retry, timeout))
