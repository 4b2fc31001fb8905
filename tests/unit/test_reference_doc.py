"""docs/reference.md stays true to the code: every command, field, event and error is listed."""

from __future__ import annotations

import typing
from pathlib import Path

from treadle.kernel import commands as c
from treadle.kernel import errors
from treadle.kernel import events as ev

DOC = (Path(__file__).resolve().parents[2] / "docs" / "reference.md").read_text()


def test_every_command_and_result_field_is_documented() -> None:
    """Each command type, command field and result field appears in the reference."""
    for command_type, model in c.COMMAND_TYPES.items():
        assert f"`{command_type}`" in DOC
        for name in [*model.model_fields, *c.RESULT_TYPES[command_type].model_fields]:
            assert f"`{name}" in DOC, f"{command_type}: field {name} undocumented"


def _command_table_types() -> list[str]:
    """The ``type`` column of the reference's command table, in its order."""
    section = DOC.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [row.split("`", 2)[1] for row in rows]


def test_the_command_table_has_one_row_per_registered_command() -> None:
    """The command table lists exactly the registry's commands, once each and in the
    registry's order: a new command needs its row, a removed one loses it."""
    assert _command_table_types() == [spec.type for spec in c.COMMANDS]


def test_every_event_type_is_documented() -> None:
    """Each event type of the union appears in the reference with its own fields."""
    for model in typing.get_args(typing.get_args(ev.Event)[0]):
        assert f"`{model.model_fields['type'].default}`" in DOC
        for name in model.model_fields:
            assert f"`{name}" in DOC or name in ("workflow_run_id", "sequence", "timestamp")


def test_every_error_class_is_documented() -> None:
    """Each TreadleError subclass appears in the error tree of the reference."""
    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, errors.TreadleError):
            assert name in DOC, f"{name} missing from docs/reference.md"
