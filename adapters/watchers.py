"""``Watchers``: the callbacks a persistence tells after a commit, once it happened.

Each adapter tells this process's interested parties what a commit did without their
polling: runs that ended (``run_ends``), due times written (``due_times``), queues that
got jobs (``queued_jobs``), events appended (``event_feed``). The four share this one
shape, typed by what their callbacks receive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, ParamSpec

P = ParamSpec("P")


class Watchers(Generic[P]):
    """Callbacks to tell after a commit. Cheap when nobody watches."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: list[Callable[P, None]] = []

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def watch(self, callback: Callable[P, None]) -> Callable[[], None]:
        """Call ``callback`` after each commit of the kind this instance is for; returns
        the function that stops it (idempotent)."""
        self._callbacks.append(callback)

        def stop() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return stop

    def tell(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Called by the adapter after the commit: a failing callback does not stop the
        others, and never fails the commit, which already happened."""
        for callback in tuple(self._callbacks):
            try:
                callback(*args, **kwargs)
            except Exception:  # a watcher's bug must not surface in the committer
                continue
