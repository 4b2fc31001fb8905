"""The pytest plugin: treadle_engine (with @pytest.mark.treadle) and fake_clock."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.testing import FakeClock, TestEngine


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
