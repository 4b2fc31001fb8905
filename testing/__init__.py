"""The test harness: ``TestEngine``, ``FakeClock``, the in-memory fakes and chaos.

Also registered as a pytest plugin (``pytest11`` entry point) giving the
``treadle_engine`` and ``fake_clock`` fixtures and the fresh-database fixtures of
``treadle.testing.databases`` (``treadle_postgres_url``, ``treadle_sqlite_url``, ...).
Names load on first use, so the plugin's import (before coverage starts) does not
import the kernel.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treadle.adapters.memory import (
        CollectingEventSink,
        InMemoryBlobStore,
        InMemoryJobTransport,
        InMemoryPersistence,
        InMemoryScheduler,
    )
    from treadle.kernel.errors import SimulatedCrash
    from treadle.testing.chaos import Chaos, ChaosPersistence, with_chaos
    from treadle.testing.clock import FakeClock
    from treadle.testing.engine import RunHandle, StageMock, StepMock, TestEngine

_WHERE = {
    "Chaos": "treadle.testing.chaos",
    "ChaosPersistence": "treadle.testing.chaos",
    "CollectingEventSink": "treadle.adapters.memory",
    "FakeClock": "treadle.testing.clock",
    "InMemoryBlobStore": "treadle.adapters.memory",
    "InMemoryJobTransport": "treadle.adapters.memory",
    "InMemoryPersistence": "treadle.adapters.memory",
    "InMemoryScheduler": "treadle.adapters.memory",
    "RunHandle": "treadle.testing.engine",
    "SimulatedCrash": "treadle.kernel.errors",
    "StageMock": "treadle.testing.engine",
    "StepMock": "treadle.testing.engine",
    "TestEngine": "treadle.testing.engine",
    "with_chaos": "treadle.testing.chaos",
}

__all__ = [
    "Chaos",
    "ChaosPersistence",
    "CollectingEventSink",
    "FakeClock",
    "InMemoryBlobStore",
    "InMemoryJobTransport",
    "InMemoryPersistence",
    "InMemoryScheduler",
    "RunHandle",
    "SimulatedCrash",
    "StageMock",
    "StepMock",
    "TestEngine",
    "with_chaos",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'treadle.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
