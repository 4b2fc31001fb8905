"""What every backend stores: the rules for JSON values and durations, checked in one place.

A value Treadle keeps (run input and config, search attributes, signal and update
payloads, stage outputs, step results, published state) is *storable JSON* when:

* its strings, object keys included, hold no NUL character (PostgreSQL text and jsonb
  refuse it) and no lone surrogate (it has no UTF-8 form: no driver can send it);
* its object keys are strings;
* its integers fit in 64 bits, ``-2**63 .. 2**63 - 1`` (SQLite's JSON turns larger ones
  into floats);
* its floats are finite (NaN and infinity are not JSON; pydantic would write ``null``);
* its arrays and objects nest at most ``MAX_DEPTH`` (128) levels deep: pydantic stops
  serialising at 255 and its JSON parser at 200, and a stored value may be wrapped in an
  event or a journal entry a few levels deeper;
* it holds nothing else (no datetimes, models or bytes: those are dumped to JSON first).

The kernel checks values at the door (``run.create``, ``run.signal``, ``run.update``)
and before a stage or step result is committed, so memory, SQLite and PostgreSQL accept
the same values; a value that breaks a rule is refused with a ``TreadleValidationError``
naming its path (``input.items[3].name: contains a NUL character``), and nothing is
written.

Durations (timeouts, delays, poll intervals) are at most ``MAX_DURATION``, about ten
years: a datetime plus a longer one soon overflows, and a longer wait is a mistake.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, StringConstraints, TypeAdapter
from pydantic_core import PydanticSerializationError

from treadle.kernel.errors import TreadleValidationError
from treadle.kernel.text import safe_text, text_problem

MAX_DEPTH = 128
"""Deepest nesting of arrays and objects in a stored value."""

MIN_INT = -(2**63)
MAX_INT = 2**63 - 1

MAX_DURATION = timedelta(days=3653)
"""Longest timeout, delay or interval: ten years."""

_PATH_PARTS = 8
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ANY: TypeAdapter[Any] = TypeAdapter(Any)


class _Problem(Exception):  # noqa: N818 - a private signal, never raised out of the walk
    """Unwinds the walk from the offending value; ``parts`` is its path, innermost first."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.parts: list[str] = []


def _key(key: str) -> str:
    return f".{key}" if _IDENTIFIER.match(key) else f"[{key!r}]"


_JSON_BASES: tuple[type[Any], ...] = (str, int, float, dict, list, tuple)
_PLAIN = frozenset({str, int, float, dict, list, tuple, bool, type(None)})


def _value(value: Any, depth: int, strict: bool) -> bool:
    """Check ``value`` at nesting ``depth``; ``_Problem`` if it breaks a rule. Returns
    whether it holds values of other types (models, datetimes), which only a lenient
    walk (``strict=False``) lets through, for the caller to check once pydantic dumped
    them. Types are compared by identity first: ``isinstance`` against a pydantic model
    instance costs several times more, and this runs on every stage output."""
    kind = type(value)
    if kind is str:
        if "\x00" in value or not value.isascii():  # the common case costs no call
            problem = text_problem(value)
            if problem is not None:
                raise _Problem(problem)
        return False
    if kind is int:
        if not MIN_INT <= value <= MAX_INT:
            raise _Problem("integer out of the 64-bit range every backend stores")
        return False
    if kind is float:
        if not math.isfinite(value):
            raise _Problem(f"{value} is not a JSON number")
        return False
    if kind is dict:
        return _mapping(value, depth + 1, strict)
    if kind is list or kind is tuple:
        return _sequence(value, depth + 1, strict)
    if value is None or kind is bool:
        return False
    if issubclass(kind, _JSON_BASES):  # subclasses (enums): checked as their base
        return _value(_base(value), depth, strict)
    if strict:
        raise _Problem(f"{kind.__name__} is not a JSON value")
    return True


def _mapping(value: dict[Any, Any], depth: int, strict: bool) -> bool:
    if depth > MAX_DEPTH:
        raise _Problem(f"nested deeper than {MAX_DEPTH} levels")
    opaque = False
    for key, item in value.items():
        if type(key) is not str:
            if strict or not isinstance(key, str | int | float | bool):
                raise _Problem(f"object key {key!r} is not a string")
            opaque = True  # pydantic dumps it as a string: checked then
            key = str(key)
        if "\x00" in key or not key.isascii():
            problem = text_problem(key)
            if problem is not None:
                error = _Problem(f"object key {problem}")
                error.parts.append(_key(key))
                raise error
        leaf = type(item)  # the common leaves pass here without a call to ``_value``
        if leaf is str:
            if item.isascii() and "\x00" not in item:
                continue
        elif leaf is int:
            if MIN_INT <= item <= MAX_INT:
                continue
        elif leaf is float:
            if math.isfinite(item):
                continue
        elif item is None or leaf is bool:
            continue
        try:
            if _value(item, depth, strict):
                opaque = True
        except _Problem as error:
            error.parts.append(_key(key))
            raise
    return opaque


def _sequence(value: list[Any] | tuple[Any, ...], depth: int, strict: bool) -> bool:
    if depth > MAX_DEPTH:
        raise _Problem(f"nested deeper than {MAX_DEPTH} levels")
    opaque = False
    for index, item in enumerate(value):
        leaf = type(item)  # the common leaves pass here without a call to ``_value``
        if leaf is str:
            if item.isascii() and "\x00" not in item:
                continue
        elif leaf is int:
            if MIN_INT <= item <= MAX_INT:
                continue
        elif leaf is float:
            if math.isfinite(item):
                continue
        elif item is None or leaf is bool:
            continue
        try:
            if _value(item, depth, strict):
                opaque = True
        except _Problem as error:
            error.parts.append(f"[{index}]")
            raise
    return opaque


def _base(value: Any) -> Any:
    """A subclass's value as its JSON base type (``bool`` has no subclasses)."""
    for base in _JSON_BASES:
        if isinstance(value, base):
            return base(value)
    return value  # pragma: no cover - the caller checked one of them


def _walk(
    value: Any, field: str, error: type[TreadleValidationError], strict: bool, what: str
) -> bool:
    try:
        return not _value(value, 0, strict)
    except _Problem as problem:
        parts = problem.parts[::-1]
        if len(parts) > _PATH_PARTS:  # a too deep value: its first and last steps say enough
            parts = [*parts[:4], "...", *parts[-2:]]
        path = field + "".join(parts)
        prefix = f"{what}: " if what else ""
        raise error(f"{prefix}{path}: {problem.problem}", [(path, problem.problem)]) from None


def check_json(
    value: Any,
    field: str,
    error: type[TreadleValidationError] = TreadleValidationError,
    *,
    what: str = "",
) -> None:
    """Refuse a JSON value that is not storable (module docstring), with ``error`` naming
    the path from ``field`` (``what`` prefixes the message: which stage, which step)."""
    _walk(value, field, error, True, what)


def precheck(
    value: Any,
    field: str,
    error: type[TreadleValidationError] = TreadleValidationError,
    *,
    what: str = "",
) -> bool:
    """``check_json`` for a value before pydantic validates and dumps it: values of other
    types are let through (their JSON form is checked after the dump), but NaN and
    infinity are caught while still there to see (pydantic dumps them in an ``Any``
    position as ``null``). Returns whether the value was plain JSON throughout."""
    kind = type(value)
    if kind not in _PLAIN and not issubclass(kind, _JSON_BASES):
        return False  # a model, a datetime...: its JSON form is checked once dumped
    return _walk(value, field, error, False, what)


def dump_json(
    serializer: Any,
    value: Any,
    field: str,
    error: type[TreadleValidationError] = TreadleValidationError,
    *,
    what: str = "",
) -> Any:
    """``serializer.to_python(value, mode="json")`` (a ``TypeAdapter``'s serializer),
    checked: a value pydantic cannot dump, or whose JSON form is not storable, is
    refused with ``error`` naming ``field``."""
    try:
        dumped = serializer.to_python(value, mode="json")
    except (PydanticSerializationError, ValueError, TypeError, RecursionError) as exc:
        prefix = f"{what}: " if what else ""
        problem = f"cannot be serialised as JSON: {safe_text(str(exc))}"
        raise error(f"{prefix}{field}: {problem}", [(field, problem)]) from None
    if type(dumped) is dict:  # a model's dump (every stage output): straight to its keys
        try:
            _mapping(dumped, 1, True)
        except _Problem:
            _walk(dumped, field, error, True, what)  # again, for the error naming the path
        return dumped
    _walk(dumped, field, error, True, what)
    return dumped


def to_json(
    value: Any,
    field: str,
    error: type[TreadleValidationError] = TreadleValidationError,
    *,
    what: str = "",
) -> Any:
    """The storable JSON form of a value of no declared type (a signal payload, a step
    result without a return annotation, published state): plain JSON is kept as it is,
    anything else is dumped by pydantic (a model becomes an object, a datetime a string)."""
    if precheck(value, field, error, what=what):
        return value
    return dump_json(_ANY.serializer, value, field, error, what=what)


def _storable_text(text: str) -> str:
    problem = text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(_storable_text)]
"""A string field of a command: refused (naming the field) if no backend could store it."""


TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
"""A W3C ``traceparent`` header value: version, trace id, parent span id, flags."""

TraceParent = Annotated[str, StringConstraints(pattern=TRACEPARENT_PATTERN)]
"""A run's stored trace context (``run.create``'s ``trace_context``)."""


# -- search attributes ----------------------------------------------------------------
_SCALARS = (str, int, float, bool, type(None))


def validate_attributes(attributes: object, *, field: str = "attributes") -> None:
    """Attribute keys are non-empty strings without ``"``; values are JSON scalars
    (indexable); both storable on every backend."""
    if not isinstance(attributes, Mapping):
        raise TreadleValidationError(f"{field}: must be a mapping", [(field, "not a mapping")])
    for key, value in attributes.items():
        if not isinstance(key, str) or key == "":
            raise TreadleValidationError(
                f"{field}: keys must be non-empty strings, got {key!r}", [(field, "bad key")]
            )
        problem = text_problem(key)
        if problem is not None:
            raise TreadleValidationError(
                f"{field}: key {key!r} {problem}", [(field, f"key {problem}")]
            )
        if '"' in key:
            # SQLite's JSON paths cannot address such a key: it would never match there.
            raise TreadleValidationError(
                f"{field}: keys must not contain a double quote, got {key!r}",
                [(field, "bad key")],
            )
        if not isinstance(value, _SCALARS):
            raise TreadleValidationError(
                f"{field}.{key}: value must be a string, number, boolean or null, "
                f"got {type(value).__name__}",
                [(f"{field}.{key}", "not a JSON scalar")],
            )
        check_json(value, f"{field}.{key}")


# -- durations ------------------------------------------------------------------------
_MAX_TEXT = f"{MAX_DURATION.days} days (ten years)"


def _within_max(value: timedelta) -> timedelta:
    if abs(value) > MAX_DURATION:
        raise ValueError(f"must be at most {_MAX_TEXT}, got {value}")
    return value


Duration = Annotated[timedelta, AfterValidator(_within_max)]
"""A ``timedelta`` field (a number means seconds) no longer than ``MAX_DURATION``."""


def to_duration(
    value: Any, what: str, *, least: Literal["positive", "zero", "any"] = "positive"
) -> timedelta:
    """A ``timedelta`` or a number of seconds as a ``timedelta`` no longer than
    ``MAX_DURATION`` either way, and above zero (``least="positive"``) or not below it
    (``"zero"``); ``ValueError`` saying what is wrong with ``what`` otherwise (NaN,
    infinity, a negative or too long duration, not a duration at all)."""
    if isinstance(value, timedelta):
        delta = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
        if abs(value) > MAX_DURATION.total_seconds():
            raise ValueError(f"{what} must be at most {_MAX_TEXT}, got {value!r} seconds")
        delta = timedelta(seconds=value)
    else:
        raise ValueError(
            f"{what} must be a timedelta or a number of seconds, got {type(value).__name__}"
        )
    if least == "positive" and delta <= timedelta(0):
        raise ValueError(f"{what} must be positive, got {value!r}")
    if least == "zero" and delta < timedelta(0):
        raise ValueError(f"{what} must not be negative, got {value!r}")
    if abs(delta) > MAX_DURATION:
        raise ValueError(f"{what} must be at most {_MAX_TEXT}, got {delta}")
    return delta
