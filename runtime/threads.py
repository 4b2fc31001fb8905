"""``StageThreadPool``: the bounded thread pool a host process runs sync stages in.

The kernel runs a sync stage body with ``asyncio.to_thread``, that is on the event
loop's default executor. A host that owns its loop (the worker process, a Lambda
container) installs this pool there instead of the standard ``ThreadPoolExecutor``
for one reason: a thread cannot be cancelled. When a drain deadline passes, the
asyncio side of a sync stage is cancelled and its job released, but the thread keeps
running its body; the standard pool joins every worker thread at interpreter exit,
so one stuck stage would keep the process alive forever. These threads are daemons,
never joined at exit, and ``shutdown(wait=True)`` waits at most ``join_timeout``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_WorkItem = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class StageThreadPool(ThreadPoolExecutor):
    """At most ``max_workers`` daemon threads, started on demand and reused.

    A ``ThreadPoolExecutor`` only by type: ``loop.set_default_executor`` accepts nothing
    else. It shares none of its machinery (whose exit hook joins every thread), so the
    base initialiser is deliberately not called.
    """

    _counter = itertools.count(1)

    def __init__(
        self,
        max_workers: int,
        *,
        thread_name_prefix: str = "treadle-stage",
        join_timeout: float = 1.0,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers!r}")
        self.max_workers = max_workers
        self.join_timeout = join_timeout
        self._prefix = f"{thread_name_prefix}-{next(self._counter)}"
        self._queue: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            future: Future[T] = Future()
            self._queue.put((future, fn, args, kwargs))
            # Reuse an idle thread if there is one, else start another up to the bound.
            if not self._idle.acquire(blocking=False) and len(self._workers) < self.max_workers:
                thread = threading.Thread(
                    target=self._work,
                    name=f"{self._prefix}_{len(self._workers)}",
                    daemon=True,
                )
                thread.start()
                self._workers.append(thread)
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del item, future, fn, args, kwargs  # drop references before idling
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._workers:
                self._queue.put(None)
        if wait:
            deadline = time.monotonic() + self.join_timeout
            for thread in self._workers:
                thread.join(max(0.0, deadline - time.monotonic()))
