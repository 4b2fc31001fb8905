"""Argument checks of the client facades (``Engine`` and ``TestEngine``), in one place, so
both refuse the same bad argument with the same ``TreadleValidationError`` naming it, and
nothing is written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import ValidationError as PydanticValidationError

import treadle.kernel.commands as c
from treadle.kernel.ai import budget
from treadle.kernel.errors import TreadleValidationError
from treadle.kernel.limits import to_duration

C = TypeVar("C", bound=c.CommandBase)

ARGUMENT_NAMES = {
    "workflow_run_id": "run_id",
    "from_stage_id": "stage_id",
    "statuses": "status",
    "max_runs": "batch_size",
}
"""Command fields whose facade argument has another name, so errors name the argument."""


def invalid(argument: str, problem: str) -> TreadleValidationError:
    return TreadleValidationError(f"{argument}: {problem}", [(argument, problem)])


def build_command(cls: type[C], method: str, *, facade: str = "Engine", **fields: Any) -> C:
    """Construct a command, turning pydantic's error into one that names the argument."""
    try:
        return cls(**fields)
    except PydanticValidationError as exc:
        errors: list[tuple[str, str]] = []
        for err in exc.errors():
            loc = [str(part) for part in err.get("loc", ())]
            if loc:
                loc[0] = ARGUMENT_NAMES.get(loc[0], loc[0])
            errors.append((".".join(loc) or "<root>", str(err.get("msg", "invalid"))))
        detail = "; ".join(f"{path}: {msg}" for path, msg in errors)
        raise TreadleValidationError(
            f"invalid argument to {facade}.{method}: {detail}", errors
        ) from None


def non_empty(value: Any, argument: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(argument, f"must be a non-empty string, got {value!r}")
    return value


def count(value: Any, argument: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(argument, f"must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise invalid(argument, f"must be between {minimum} and {maximum}, got {value}")
    return value


def mapping(value: Any, argument: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise invalid(argument, f"must be a mapping, got {type(value).__name__}")
    return dict(value)


def duration(value: Any, argument: str) -> timedelta:
    """A positive ``timedelta`` or number of seconds within ``limits.MAX_DURATION``."""
    try:
        return to_duration(value, argument)
    except ValueError as exc:
        raise TreadleValidationError(str(exc), [(argument, str(exc))]) from None


def start_command(
    facade: str,
    workflow_id: Any,
    input: Any,
    *,
    idempotency_key: str | None,
    priority: Any,
    config: Mapping[str, Any] | None,
    run_id: str | None,
    search_attributes: Mapping[str, Any] | None,
    execution_timeout: timedelta | float | None,
    concurrency_key: str | None = None,
    max_cost: Any = None,
) -> c.RunCreate:
    """``run.create`` for ``{facade}.start(...)``, its arguments checked."""
    return build_command(
        c.RunCreate,
        "start",
        facade=facade,
        workflow_id=non_empty(workflow_id, "workflow_id"),
        input=input,
        idempotency_key=idempotency_key,
        priority=count(priority, "priority", minimum=0, maximum=100),
        config=mapping(config, "config"),
        run_id=run_id,
        search_attributes=mapping(search_attributes, "search_attributes"),
        execution_timeout=(
            None if execution_timeout is None else duration(execution_timeout, "execution_timeout")
        ),
        concurrency_key=concurrency_key,
        max_cost=None if max_cost is None else amount(max_cost, "max_cost"),
    )


def amount(value: Any, argument: str) -> Decimal:
    """A money amount (``max_cost``): Decimal, number or numeric text, at least 0."""
    try:
        return budget(value, argument)
    except ValueError as exc:
        raise invalid(argument, str(exc)) from None


def start_items(facade: str, items: Any) -> list[c.RunCreateItem]:
    """The items of ``{facade}.start_many(items)`` as ``run.createMany`` items; an error
    names ``items[i].field``. ``None`` for ``config``, ``search_attributes`` or
    ``priority`` means the default, as it does for ``start``."""
    if isinstance(items, Mapping | str | bytes) or not isinstance(items, Iterable):
        raise invalid("items", f"must be a list of mappings, got {type(items).__name__}")
    return [_start_item(facade, item, index) for index, item in enumerate(items)]


def _start_item(facade: str, item: Any, index: int) -> c.RunCreateItem:
    if isinstance(item, c.RunCreateItem):
        return item
    where = f"items[{index}]"
    if not isinstance(item, Mapping):
        raise invalid(where, f"must be a mapping or a StartItem, got {type(item).__name__}")
    fields = {
        key: value
        for key, value in item.items()
        if value is not None or key not in ("config", "search_attributes", "priority")
    }
    try:
        return c.RunCreateItem.model_validate(fields)
    except PydanticValidationError as exc:
        errors = [
            (".".join([where, *(str(part) for part in err.get("loc", ()))]), err["msg"])
            for err in exc.errors()
        ]
        detail = "; ".join(f"{path}: {msg}" for path, msg in errors)
        raise TreadleValidationError(
            f"invalid argument to {facade}.start_many: {detail}", errors
        ) from None
