"""The pytest plugin: treadle_engine (with @pytest.mark.treadle) and fake_clock."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.testing import FakeClock, TestEngine
from treadle.tests.docs.projects import run_pytest


class In(BaseModel):
    n: int


@define_stage(id="inc", input=In, output=In)
async def inc(ctx):  # type: ignore[no-untyped-def]
    return In(n=ctx.input.n + 1)


WF = WorkflowBuilder("inc-wf", input=In).pipe(inc).build()


@pytest.mark.treadle(workflows=[WF])
async def test_treadle_engine_with_marker(treadle_engine: TestEngine) -> None:
    """The marker's workflows are registered on a fresh TestEngine."""
    handle = await treadle_engine.start("inc-wf", {"n": 1})
    assert await handle.result() == {"n": 2}
    assert treadle_engine.event_sink.types(handle.run_id)[-1] == "workflow:completed"


async def test_treadle_engine_without_marker(treadle_engine: TestEngine) -> None:
    """Without a marker the engine starts empty and accepts register()."""
    assert treadle_engine.persistence.runs == {}
    treadle_engine.register(WF)
    handle = await treadle_engine.start("inc-wf", {"n": 41})
    assert await handle.result() == {"n": 42}


def test_fake_clock_fixture(fake_clock: FakeClock) -> None:
    """fake_clock starts at 2026-01-01T00:00Z and moves only when told to."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert fake_clock.now() == start
    assert fake_clock.now() == start
    assert fake_clock.advance(5) == start + timedelta(seconds=5)
    fake_clock.set(start + timedelta(hours=1))
    assert fake_clock.now() == start + timedelta(hours=1)
    with pytest.raises(ValueError, match="backwards"):
        fake_clock.set(start)
    with pytest.raises(ValueError, match="timezone-aware"):
        fake_clock.set(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeClock(datetime(2030, 1, 1))


async def test_fake_clock_is_the_engine_clock(
    treadle_engine: TestEngine, fake_clock: FakeClock
) -> None:
    """A test asking for both fixtures gets one clock: advance_time moves what fake_clock
    reads, and a time set on fake_clock is the engine's now."""
    assert treadle_engine.clock is fake_clock
    start = fake_clock.now()
    await treadle_engine.advance_time(timedelta(hours=1))
    assert fake_clock.now() == start + timedelta(hours=1)
    fake_clock.advance(timedelta(minutes=5))
    assert treadle_engine.clock.now() == start + timedelta(hours=1, minutes=5)


def test_test_engine_takes_a_clock_or_a_start_not_both() -> None:
    """TestEngine(clock=...) shares the caller's clock; giving a start too is refused."""
    clock = FakeClock(datetime(2030, 5, 1, tzinfo=UTC))
    assert TestEngine(clock=clock).clock is clock
    assert TestEngine(start=datetime(2031, 1, 1, tzinfo=UTC)).clock.now().year == 2031
    with pytest.raises(ValueError, match="start or clock"):
        TestEngine(start=datetime(2031, 1, 1, tzinfo=UTC), clock=clock)


_PROJECT_TESTS = """
from datetime import timedelta

import pytest


async def test_ours(treadle_engine, fake_clock) -> None:
    await treadle_engine.advance_time(timedelta(hours=1))
    assert fake_clock.now().hour == 1


@pytest.mark.treadle(workflows=[])
async def test_marked_only() -> None:
    pass


async def test_not_ours() -> None:
    pass
"""


def test_plugin_runs_its_async_tests_without_pytest_asyncio(tmp_path: Path) -> None:
    """Without pytest-asyncio (disabled here), the plugin runs async tests that use its
    fixtures or marker itself; other async tests get pytest's usual refusal."""
    done = run_pytest(tmp_path, {"test_project.py": _PROJECT_TESTS}, "-p", "no:asyncio", "-rA")
    out = done.stdout
    assert "PASSED test_project.py::test_ours" in out, out
    assert "PASSED test_project.py::test_marked_only" in out, out
    assert "FAILED test_project.py::test_not_ours" in out, out
    assert "not natively supported" in out, out


def test_plugin_leaves_explicitly_marked_tests_to_pytest_asyncio(tmp_path: Path) -> None:
    """In pytest-asyncio's strict mode (no configuration) our async tests run in its loop,
    sharing it with an async fixture; a test marked asyncio with a loop scope keeps it."""
    tests = (
        _PROJECT_TESTS
        + """
import asyncio
import pytest_asyncio


@pytest_asyncio.fixture
async def loop_of_fixture():
    return asyncio.get_running_loop()


async def test_same_loop(treadle_engine, loop_of_fixture) -> None:
    assert asyncio.get_running_loop() is loop_of_fixture


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def module_loop():
    return asyncio.get_running_loop()


@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop(treadle_engine, module_loop) -> None:
    assert asyncio.get_running_loop() is module_loop
"""
    )
    done = run_pytest(tmp_path, {"test_project.py": tests}, "-rA")
    out = done.stdout
    for name in ("test_ours", "test_marked_only", "test_same_loop", "test_module_loop"):
        assert f"PASSED test_project.py::{name}" in out, out
    assert "FAILED test_project.py::test_not_ours" in out, out


def test_plugin_import_does_not_import_the_kernel() -> None:
    """pytest loads the plugin before coverage starts, so importing it must not import
    the kernel (or every module-level kernel line would count as uncovered)."""
    code = (
        "import sys, treadle.testing.plugin\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('treadle.'))\n"
        "assert loaded == ['treadle.testing', 'treadle.testing.plugin'], loaded\n"
        "from treadle import WorkflowBuilder, TreadleError\n"
        "from treadle.testing import TestEngine\n"
        "import treadle, treadle.testing\n"
        "assert 'define_stage' in dir(treadle) and 'TestEngine' in dir(treadle.testing)\n"
        "for mod in (treadle, treadle.testing):\n"
        "    try:\n"
        "        mod.nope\n"
        "    except AttributeError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit('missing attribute did not raise')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
