"""pytest plugin: ``treadle_engine`` and ``fake_clock`` fixtures.

Mark a test ``@pytest.mark.treadle(workflows=[pipeline])`` to pre-register
workflows, or call ``treadle_engine.register(pipeline)`` inside it.

pytest imports this module (entry point ``pytest11``) before coverage starts, so
it imports Treadle itself only inside the fixtures; otherwise every module-level
line of the kernel would count as not covered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from treadle.testing.clock import FakeClock
    from treadle.testing.engine import TestEngine


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "treadle(workflows=[...]): workflows the treadle_engine fixture registers"
    )


@pytest.fixture
def fake_clock() -> FakeClock:
    """A virtual clock at 2026-01-01T00:00Z that moves only when told to."""
    from treadle.testing.clock import FakeClock

    return FakeClock()


@pytest.fixture
def treadle_engine(request: pytest.FixtureRequest) -> TestEngine:
    """A fresh ``TestEngine`` per test, with the workflows of the ``treadle`` marker."""
    from treadle.testing.engine import TestEngine

    marker = request.node.get_closest_marker("treadle")
    workflows = list(marker.kwargs.get("workflows", ())) if marker is not None else []
    return TestEngine(workflows)
