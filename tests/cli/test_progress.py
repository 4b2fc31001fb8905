"""``treadle start --wait``'s progress line says what a suspended run waits for
(issue 13, item 11)."""

from __future__ import annotations

from treadle.tests.cli.helpers import Invoke


def test_start_wait_says_which_signal_a_code_workflow_waits_for(invoke: Invoke) -> None:
    """A code workflow parked on ``wait_for_signal("approve")`` shows ``waiting for signal
    approve`` (not "waiting on batch job") until ``--timeout`` gives up."""
    result = invoke(
        "start", "approval", '{"name": "ada"}', "--wait", "--local-worker", "--timeout", "1.5"
    )
    assert result.exit_code != 0
    assert "waiting for signal approve" in result.stdout
    assert "batch" not in result.stdout


def test_start_wait_says_when_a_batch_stage_polls_next(invoke: Invoke) -> None:
    """A pipeline suspended on a batch stage shows the stage's next poll."""
    result = invoke(
        "start", "batch", '{"name": "never"}', "--wait", "--local-worker", "--timeout", "1.5"
    )
    assert result.exit_code != 0
    assert "wait-batch batch poll at" in result.stdout
