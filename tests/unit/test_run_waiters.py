"""``RunWaiters``: the outcomes of runs started here, handed to ``result`` without a read."""

from __future__ import annotations

from datetime import UTC, datetime

from treadle.kernel.model import Run, RunStatus
from treadle.runtime import run_waiters
from treadle.runtime.run_waiters import RunWaiters

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def _run(run_id: str, status: RunStatus = RunStatus.COMPLETED) -> Run:
    return Run(
        id=run_id,
        workflow_id="wf",
        status=status,
        output={"ok": run_id},
        created_at=NOW,
        updated_at=NOW,
    )


async def test_an_expected_run_gives_its_outcome_once() -> None:
    waiters = RunWaiters(persistence=None, wake_source=None)
    waiters.expect("r1")
    assert waiters.expecting("r1")
    assert waiters.outcome("r1") is None  # not ended yet
    waiters.ended(["r1", "r2"], {"r1": _run("r1"), "r2": _run("r2")})
    assert not waiters.expecting("r1")
    outcome = waiters.outcome("r1")
    assert outcome is not None
    assert outcome.output == {"ok": "r1"}
    assert waiters.outcome("r1") is None  # taken: a later result reads the run
    assert waiters.outcome("r2") is None  # never expected: not kept


async def test_an_end_heard_without_its_outcome_leaves_the_run_to_a_read() -> None:
    """A NOTIFY from another process names the run but brings no outcome: the waiter is
    woken, and nothing is kept (it reads)."""
    waiters = RunWaiters(persistence=None, wake_source=None)
    waiters.expect("r1")
    woken = waiters.waiter("r1")
    waiters.ended(["r1"])
    assert woken.done()
    assert waiters.outcome("r1") is None
    waiters.forget_expected("r1")  # the fallback poll gives up on hearing it here
    assert not waiters.expecting("r1")


async def test_expected_runs_are_bounded() -> None:
    """Runs started here and never awaited do not pile up: the oldest are forgotten."""
    waiters = RunWaiters(persistence=None, wake_source=None)
    limit = run_waiters.EXPECTED_LIMIT
    for i in range(limit + 5):
        waiters.expect(f"r{i}")
    assert not waiters.expecting("r0")
    assert not waiters.expecting("r4")
    assert waiters.expecting("r5")
    assert waiters.expecting(f"r{limit + 4}")
