"""One closing verb: ``aclose()`` and ``async with``, across Treadle's closable objects."""

from __future__ import annotations

import pytest

from treadle import Engine, TreadleError
from treadle.runtime import open_backend
from treadle.runtime.run_waiters import RunWaiters


async def test_engine_close_is_an_alias_of_aclose() -> None:
    """``Engine.close()`` (DESIGN.md §3.3) closes exactly as ``aclose()`` does; both are
    idempotent and a closed engine refuses work."""
    engine = await Engine.open("memory://")
    await engine.close()
    await engine.aclose()
    with pytest.raises(TreadleError, match="closed"):
        engine.worker()


async def test_async_with_closes_the_engine_and_its_worker() -> None:
    """Leaving ``async with`` closes the worker, then the engine."""
    async with await Engine.open("memory://") as engine:
        async with engine.worker(job_poll_interval=0.05) as worker:
            assert worker.running
        assert not worker.running
    with pytest.raises(TreadleError, match="closed"):
        engine.worker()


async def test_backend_and_run_waiters_close_with_async_with() -> None:
    """A backend and the result waiters close through ``async with`` too."""
    backend = await open_backend("memory://")
    async with backend, RunWaiters(persistence=backend.persistence, wake_source=None) as w:
        assert w is not None
