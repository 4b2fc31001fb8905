"""Kernel.dispatch: mappings through the discriminated union, validation errors that
name the field, and bad input that writes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.errors import (
    InvalidCommandError,
    InvalidConfigError,
    InvalidInputError,
    InvalidStateError,
    NotSupportedError,
    RunNotFoundError,
    TreadleValidationError,
    UnknownCommandError,
    WorkflowNotFoundError,
)
from treadle.kernel.events import WorkflowCreated
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


class Out(BaseModel):
    doubled: int


class Cfg(BaseModel):
    factor: int = 2


@define_stage(id="double", input=In, output=Out, config=Cfg)
async def double(ctx):  # type: ignore[no-untyped-def]
    return Out(doubled=ctx.input.n * ctx.config.factor)


WF = WorkflowBuilder("calc", input=In).pipe(double).build()


def _nothing_written(te: TestEngine) -> None:
    p = te.persistence
    assert p.runs == {}
    assert p.stages == {}
    assert p.outbox == {}
    assert p.events_by_run == {}
    assert te.job_transport.jobs == {}


async def test_plain_mapping_dispatch_returns_typed_result() -> None:
    """A mapping with a type field is parsed into its command and gets a typed result."""
    te = TestEngine([WF])
    result = await te.dispatch({"type": "run.create", "workflow_id": "calc", "input": {"n": 2}})
    assert isinstance(result, c.RunCreateResult)
    assert result.status == "PENDING"
    claim = await te.dispatch({"type": "run.claimPending", "worker_id": "w"})
    assert isinstance(claim, c.RunClaimPendingResult)
    assert claim.claimed[0].workflow_run_id == result.workflow_run_id
    assert len(claim.claimed[0].job_ids) == 1


async def test_duration_fields_accept_seconds() -> None:
    """Duration fields are timedelta; a bare number means seconds."""
    cmd = te_parse({"type": "lease.reapStale", "stale_threshold": 90})
    assert isinstance(cmd, c.LeaseReapStale)
    assert cmd.stale_threshold == timedelta(seconds=90)


def te_parse(data: dict[str, object]) -> c.CommandBase:
    return TestEngine([WF]).kernel.parse(data)


async def test_unknown_command_type() -> None:
    """An unknown type raises UnknownCommandError listing the known types."""
    te = TestEngine([WF])
    with pytest.raises(UnknownCommandError, match=r"'run\.explode'.*run\.create"):
        await te.dispatch({"type": "run.explode"})
    with pytest.raises(UnknownCommandError):
        await te.dispatch({"no_type": 1})


async def test_bad_fields_name_the_field() -> None:
    """A bad or unknown field raises InvalidCommandError naming that field."""
    te = TestEngine([WF])
    with pytest.raises(InvalidCommandError) as info:
        await te.dispatch({"type": "run.claimPending", "worker_id": "w", "max_claims": 0})
    assert info.value.errors[0][0].endswith("max_claims")
    assert "max_claims" in str(info.value)
    with pytest.raises(InvalidCommandError, match="bogus"):
        await te.dispatch({"type": "run.cancel", "workflow_run_id": "r", "bogus": 1})
    with pytest.raises(InvalidCommandError, match="workflow_run_id"):
        await te.dispatch({"type": "run.transition"})
    assert isinstance(info.value, TreadleValidationError)


async def test_non_mapping_command_rejected() -> None:
    """Something that is neither a command nor a mapping is an InvalidCommandError."""
    te = TestEngine([WF])
    with pytest.raises(InvalidCommandError, match="mapping"):
        await te.dispatch(["run.create"])  # type: ignore[arg-type]


async def test_invalid_input_writes_nothing() -> None:
    """Invalid run input raises InvalidInputError naming the field; no run, no event."""
    te = TestEngine([WF])
    with pytest.raises(InvalidInputError) as info:
        await te.start("calc", {"n": "not a number"})
    assert info.value.errors[0][0] == "input.n"
    _nothing_written(te)


async def test_invalid_config_writes_nothing() -> None:
    """Invalid stage config raises InvalidConfigError naming the field; nothing is written."""
    te = TestEngine([WF])
    with pytest.raises(InvalidConfigError) as info:
        await te.start("calc", {"n": 1}, config={"double": {"factor": "x"}})
    assert info.value.errors[0][0] == "config.double.factor"
    with pytest.raises(InvalidConfigError, match="unknown stage"):
        await te.start("calc", {"n": 1}, config={"nope": {}})
    _nothing_written(te)


async def test_invalid_search_attributes_write_nothing() -> None:
    """Non-scalar search attributes are rejected naming the attribute; nothing written."""
    te = TestEngine([WF])
    with pytest.raises(TreadleValidationError, match=r"search_attributes\.tags"):
        await te.start("calc", {"n": 1}, search_attributes={"tags": ["a"]})
    _nothing_written(te)


async def test_search_attribute_keys_with_a_double_quote_are_refused() -> None:
    """A key SQLite's JSON paths cannot address is refused at start (nothing written),
    so no backend silently fails to match it later."""
    te = TestEngine([WF])
    with pytest.raises(TreadleValidationError, match="must not contain a double quote"):
        await te.start("calc", {"n": 1}, search_attributes={'say "hi"': 1})
    _nothing_written(te)


async def test_unknown_workflow_writes_nothing() -> None:
    """Creating a run of an unregistered workflow raises WorkflowNotFoundError."""
    te = TestEngine([WF])
    with pytest.raises(WorkflowNotFoundError, match="nope"):
        await te.start("nope", {})
    _nothing_written(te)


async def test_signal_with_start_not_supported_for_pipelines() -> None:
    """run.create with a signal is NotSupported for a pipeline and writes nothing."""
    te = TestEngine([WF])
    with pytest.raises(NotSupportedError):
        await te.dispatch(
            {
                "type": "run.create",
                "workflow_id": "calc",
                "input": {"n": 1},
                "signal": {"name": "go"},
            }
        )
    _nothing_written(te)


async def test_create_stores_run_stages_and_created_event() -> None:
    """run.create stores a PENDING run with config defaults, its stages and one event."""
    te = TestEngine([WF])
    handle = await te.start("calc", {"n": 3}, priority=7, run_id="run-1")
    run = await te.get_run(handle.run_id)
    assert run.id == "run-1"
    assert run.status == "PENDING"
    assert run.priority == 7
    assert run.config == {"double": {"factor": 2}}
    assert [(s.stage_id, s.status.value, s.execution_group) for s in run.stages] == [
        ("double", "PENDING", 0)
    ]
    events = await te.kernel.reads.events("run-1")
    assert len(events) == 1
    assert isinstance(events[0], WorkflowCreated)
    assert events[0].priority == 7


@pytest.mark.parametrize(
    "command",
    [
        {"type": "run.signal", "name": "approve", "payload": {}},
        {"type": "run.update", "name": "bump", "payload": 1},
        {"type": "review.decide", "review_id": "r1", "decision": "approved"},
    ],
)
async def test_messages_not_supported_for_pipelines(command: dict[str, object]) -> None:
    """run.signal, run.update and review.decide raise NotSupportedError for pipelines."""
    te = TestEngine([WF])
    handle = await te.start("calc", {"n": 1})
    with pytest.raises(NotSupportedError, match="stage pipelines"):
        await te.dispatch({**command, "workflow_run_id": handle.run_id})
    await handle.result()
    with pytest.raises(InvalidStateError, match="COMPLETED"):
        await te.dispatch({**command, "workflow_run_id": handle.run_id})
    with pytest.raises(RunNotFoundError):
        await te.dispatch({**command, "workflow_run_id": "missing"})


async def test_get_run_missing_raises() -> None:
    """get_run on an unknown id raises RunNotFoundError."""
    te = TestEngine([WF])
    with pytest.raises(RunNotFoundError):
        await te.get_run("missing")
    with pytest.raises(RunNotFoundError):
        await te.dispatch(c.RunCancel(workflow_run_id="missing"))
