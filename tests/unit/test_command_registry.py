"""The command registry (``commands.COMMANDS``) is the one statement of the command list:
everything else that names commands agrees with it, so a new command cannot be
forgotten in one place (the steps are in docs/architecture.md, "How to add a command";
the reference table is checked by test_reference_doc.py)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from typing import Any

import pytest

from treadle.kernel import commands as c
from treadle.kernel.errors import InvalidCommandError
from treadle.kernel.kernel import Kernel, _check_handlers, _handlers

# The smallest valid mapping of each command: its required fields only. A command
# added to the registry without a row here fails ``test_a_sample_for_every_command``.
SAMPLES: dict[str, dict[str, Any]] = {
    "run.create": {"workflow_id": "wf"},
    "run.createMany": {"items": [{"workflow_id": "wf"}]},
    "run.claimPending": {"worker_id": "w"},
    "run.transition": {"workflow_run_id": "r"},
    "run.cancel": {"workflow_run_id": "r"},
    "run.rerunFrom": {"workflow_run_id": "r", "from_stage_id": "s"},
    "run.pause": {"workflow_run_id": "r"},
    "run.resume": {"workflow_run_id": "r"},
    "run.terminate": {"workflow_run_id": "r"},
    "run.purge": {},
    "job.execute": {"job_id": "j", "worker_id": "w"},
    "job.release": {"job_id": "j", "worker_id": "w", "attempt": 1, "reason": "errored"},
    "job.begin": {"job_id": "j", "worker_id": "w"},
    "job.complete": {"job_id": "j", "worker_id": "w", "attempt": 1},
    "job.fail": {"job_id": "j", "worker_id": "w", "attempt": 1, "error": "boom"},
    "job.suspend": {"job_id": "j", "worker_id": "w", "attempt": 1, "poll_interval": 5},
    "job.heartbeat": {"job_id": "j", "worker_id": "w", "attempt": 1},
    "stage.pollSuspended": {},
    "lease.reapStale": {},
    "run.reapStuck": {},
    "outbox.flush": {},
    "plugin.replayDLQ": {},
    "run.signal": {"workflow_run_id": "r", "name": "go"},
    "run.update": {"workflow_run_id": "r", "name": "go"},
    "review.decide": {"workflow_run_id": "r", "review_id": "v", "decision": "approved"},
    "schedule.create": {"schedule_id": "s", "workflow_id": "wf", "cron": "* * * * *"},
    "schedule.update": {"schedule_id": "s", "paused": True},
    "schedule.delete": {"schedule_id": "s"},
    "schedule.trigger": {"schedule_id": "s"},
    "schedule.fireDue": {},
}


def test_the_registry_derives_the_lookup_tables() -> None:
    """``COMMAND_TYPES`` and ``RESULT_TYPES`` hold exactly the registry's rows, each wire
    name once, each command with a result model of its own."""
    types = [spec.type for spec in c.COMMANDS]
    assert len(types) == len(set(types)), "a command type is registered twice"
    assert list(c.COMMAND_TYPES) == types
    assert list(c.RESULT_TYPES) == types
    for spec in c.COMMANDS:
        assert issubclass(spec.command, c.CommandBase)
        assert issubclass(spec.result, c.ResultBase)
        assert c.COMMAND_TYPES[spec.type] is spec.command
        assert c.RESULT_TYPES[spec.type] is spec.result
    results = [spec.result for spec in c.COMMANDS]
    assert len(results) == len(set(results)), "two commands share a result model"


def test_the_union_is_the_registry() -> None:
    """The discriminated union behind ``Command`` has exactly the registry's models."""
    union, discriminator = typing.get_args(c.Command)
    assert set(typing.get_args(union)) == {spec.command for spec in c.COMMANDS}
    assert discriminator.discriminator == "type"


def test_a_sample_for_every_command() -> None:
    assert set(SAMPLES) == set(c.COMMAND_TYPES)


@pytest.mark.parametrize("spec", c.COMMANDS, ids=lambda spec: spec.type)
def test_the_union_accepts_a_mapping_of_each_command(spec: c.CommandSpec) -> None:
    """A plain mapping with the command's ``type`` validates to its model, through the
    adapter and through ``Kernel.parse`` (what ``dispatch`` does with a mapping)."""
    mapping = {"type": spec.type, **SAMPLES[spec.type]}
    assert type(c.COMMAND_ADAPTER.validate_python(mapping)) is spec.command
    assert type(Kernel.parse(mapping)) is spec.command
    if SAMPLES[spec.type]:
        with pytest.raises(InvalidCommandError):
            Kernel.parse({"type": spec.type})


def test_every_command_has_a_handler() -> None:
    """The kernel's handler table covers the registry, no more, with async handlers."""
    table = _handlers()
    assert set(table) == set(c.COMMAND_TYPES)
    for command_type, (handler, phased) in table.items():
        assert inspect.iscoroutinefunction(handler), command_type
        assert isinstance(phased, bool)


def test_a_handler_table_that_disagrees_with_the_registry_is_refused() -> None:
    """A kernel cannot be built with a registered command missing from its table (nor
    with a handler for a command that is not registered): the error names the type."""
    table = dict(_handlers())
    del table["run.cancel"]
    with pytest.raises(RuntimeError, match=r"no handler for \['run.cancel'\]"):
        _check_handlers(table)
    with pytest.raises(RuntimeError, match=r"unregistered \['run.explode'\]"):
        _check_handlers({**_handlers(), "run.explode": object()})


def _overload_pairs() -> dict[type[Any], type[Any]]:
    """``Kernel.dispatch``'s typed overloads as command model -> result model, leaving
    out the catch-all overload for a base command or a mapping."""
    pairs: dict[type[Any], type[Any]] = {}
    for overload in typing.get_overloads(Kernel.dispatch):
        hints = typing.get_type_hints(overload)
        command, result = hints["command"], hints["return"]
        if not isinstance(command, type) or command is c.CommandBase:
            assert result is c.ResultBase, f"catch-all overload returns {result}"
            assert Mapping[str, Any] in typing.get_args(command)
            continue
        assert command not in pairs, f"two overloads for {command.__name__}"
        pairs[command] = result
    return pairs


def test_every_command_has_a_dispatch_overload_with_its_result() -> None:
    """Each registered command has a ``dispatch`` overload, which returns the command's
    registered result model (mypy cannot derive overloads from data; this test keeps
    them honest)."""
    pairs = _overload_pairs()
    assert pairs == {spec.command: spec.result for spec in c.COMMANDS}
