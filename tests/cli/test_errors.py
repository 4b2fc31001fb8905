"""Bad arguments get one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from treadle.tests.cli.helpers import UNREACHABLE_PG, Invoke, one_error_line


def test_unknown_workflow(invoke: Invoke) -> None:
    """Starting a workflow the app lacks names it."""
    line = one_error_line(invoke("start", "nope", "{}"))
    assert "WorkflowNotFoundError" in line
    assert "nope" in line


def test_invalid_input_json(invoke: Invoke) -> None:
    """Malformed INPUT says where the JSON broke."""
    line = one_error_line(invoke("start", "greeter", "{name: 1}"))
    assert "INPUT is not valid JSON" in line
    assert "line 1 column 2" in line


def test_input_failing_validation_names_the_field(invoke: Invoke) -> None:
    """Input that does not match the workflow's model names the field, in one line."""
    line = one_error_line(invoke("start", "greeter", '{"nam": "x"}'))
    assert "name" in line


def test_config_must_be_an_object(invoke: Invoke) -> None:
    """--config that is not a JSON object is rejected."""
    line = one_error_line(invoke("start", "greeter", '{"name": "x"}', "--config", "[1]"))
    assert "--config must be a JSON object" in line


def test_invalid_config_names_the_stage(invoke: Invoke) -> None:
    """A config value the stage's model rejects is a one-line validation error."""
    config = '{"greet": {"punctuation": 5}}'
    line = one_error_line(invoke("start", "greeter", '{"name": "x"}', "--config", config))
    assert "greet" in line


def test_missing_input_file(tmp_path: Path, invoke: Invoke) -> None:
    """@file that does not exist is one line naming the file."""
    line = one_error_line(invoke("start", "greeter", f"@{tmp_path / 'none.json'}"))
    assert "cannot read" in line


def test_start_without_an_app(invoke: Invoke) -> None:
    """start needs --app and says how to pass it."""
    line = one_error_line(invoke("start", "greeter", "{}", app=None))
    assert "--app" in line


def test_app_that_cannot_be_imported(invoke: Invoke) -> None:
    """An --app naming a missing module is the loader's one-line error."""
    line = one_error_line(invoke("start", "greeter", "{}", app="no_such_module:workflows"))
    assert "no_such_module" in line


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("bogus", "invalid database URL"),
        ("mysql://u@h/db", "unsupported database URL scheme"),
        ("sqlite:////no/such/dir/x.db", "does not exist"),
    ],
)
def test_bad_database_urls(invoke: Invoke, url: str, needle: str) -> None:
    """A malformed, unsupported or unusable URL is one line naming the problem."""
    assert needle in one_error_line(invoke("runs", "list", db=url, app=None))


def test_unreachable_database(invoke: Invoke) -> None:
    """An unreachable PostgreSQL is one line, not a driver traceback."""
    line = one_error_line(invoke("runs", "list", db=UNREACHABLE_PG, app=None))
    assert line.startswith("error: ")


def test_database_url_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TREADLE_DATABASE_URL is used when --db is absent."""
    from typer.testing import CliRunner

    from treadle.hosts.cli import build_app

    path = tmp_path / "env.db"
    monkeypatch.setenv("TREADLE_DATABASE_URL", f"sqlite:///{path}")
    result = CliRunner().invoke(build_app(), ["migrate"])
    assert result.exit_code == 0, result.output
    assert path.exists()


def test_unexpected_errors_are_one_line_too(
    monkeypatch: pytest.MonkeyPatch, invoke: Invoke
) -> None:
    """A bug below the CLI still prints one line (TREADLE_DEBUG=1 would show the trace)."""
    from treadle.engine import Engine

    async def boom(self: Engine, *args: object, **kwargs: object) -> None:
        raise RuntimeError("surprise")

    monkeypatch.setattr(Engine, "list", boom)
    assert invoke("migrate", app=None).exit_code == 0
    line = one_error_line(invoke("runs", "list", app=None))
    assert line == "error: RuntimeError: surprise"


def test_error_line_hides_credentials_a_message_repeats(
    monkeypatch: pytest.MonkeyPatch, invoke: Invoke
) -> None:
    """An error whose text repeats a credential of --db (as a driver's might) shows it as
    ***, the rest of the message intact."""
    from treadle.engine import Engine

    async def boom(self: Engine, *args: object, **kwargs: object) -> None:
        raise RuntimeError("login as u with Pw-1a2b failed (sslpassword Ssl/3c4d)")

    monkeypatch.setattr(Engine, "list", boom)
    url = "memory://u:Pw-1a2b@x/?sslpassword=Ssl%2F3c4d"
    line = one_error_line(invoke("runs", "list", db=url, app=None))
    assert line == "error: RuntimeError: login as u with *** failed (sslpassword ***)"


# -- bad JSON and duration arguments: one line naming the argument, nothing written ----


def _no_runs(invoke: Invoke) -> bool:
    """Nothing was written: no run, or not even a database file."""
    listed = invoke("runs", "list", "--json", app=None)
    if listed.exit_code != 0:
        return "no SQLite database" in listed.stderr
    return listed.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("start", "greeter", "@{file}"), "INPUT"),
        (("start", "greeter", '{"name": "x"}', "--config", "@{file}"), "--config"),
        (("signal", "some-run", "approve", "@{file}"), "PAYLOAD"),
    ],
)
def test_binary_json_file(
    tmp_path: Path, invoke: Invoke, args: tuple[str, ...], field: str
) -> None:
    """@file that is not UTF-8 text is one line naming the argument and the file, not a
    UnicodeDecodeError; nothing is written."""
    binary = tmp_path / "data.json"
    binary.write_bytes(b"\xff\xfe{\x00}\x00\x89PNG")
    line = one_error_line(invoke(*(a.replace("{file}", str(binary)) for a in args)))
    assert (
        line == f"error: {field}: {str(binary)!r} is not UTF-8 text (invalid start byte at byte 0)"
    )
    assert _no_runs(invoke)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested more than 100 levels deep"),
        ('{"name": ' + "[" * 101 + "]" * 101 + "}", "JSON nested more than 100 levels deep"),
        ('{"name": NaN}', "is not valid JSON: NaN is not a JSON value"),
        ('{"name": -Infinity}', "is not valid JSON: -Infinity is not a JSON value"),
        ('{"name": 1e999}', "is not valid JSON: 1e999 is out of range for a number"),
        ('{"name": ' + "9" * 5000 + "}", "an integer has more than 4300 digits"),
    ],
)
def test_json_that_python_accepts_but_treadle_cannot_store(
    tmp_path: Path, invoke: Invoke, text: str, problem: str
) -> None:
    """Deep nesting (a RecursionError in the parser), NaN/Infinity and overlong numbers
    are one line naming the argument, for INPUT, --config and PAYLOAD alike."""
    source = tmp_path / "in.json"
    source.write_text(text)
    for args, field in (
        (("start", "greeter", f"@{source}"), "INPUT"),
        (("start", "greeter", '{"name": "x"}', "--config", f"@{source}"), "--config"),
        (("signal", "some-run", "approve", f"@{source}"), "PAYLOAD"),
    ):
        line = one_error_line(invoke(*args))
        assert line.startswith(f"error: {field}"), line
        assert problem in line
    assert _no_runs(invoke)


def test_json_nesting_up_to_the_limit_is_accepted(invoke: Invoke) -> None:
    """100 levels of nesting parse (and reach the workflow's own validation)."""
    deep = '{"name": "x", "extra": ' + "[" * 99 + "]" * 99 + "}"
    assert invoke("start", "greeter", deep).exit_code == 0


@pytest.mark.parametrize("option", ["--created-after", "--created-before"])
@pytest.mark.parametrize(
    "value",
    [
        "99999999d",
        "99999999999999999999s",
        "0001-01-01T00:00:00+05:00",
        "9999-12-31T23:59:59-05:00",
    ],
)
def test_created_filters_out_of_range(invoke: Invoke, option: str, value: str) -> None:
    """An age or time beyond the years 1-9999 is one line naming the option, not an
    OverflowError."""
    line = one_error_line(invoke("runs", "list", option, value, app=None))
    assert (
        line
        == f"error: {option}: {value!r} is out of range (times run from year 1 to 9999, in UTC)"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("tick", "--stale-lease-threshold", "inf"),
        ("tick", "--stuck-threshold", "1e300"),
        ("doctor", "--stuck-threshold", "inf"),
        ("doctor", "--pending-threshold", "1e300"),
        ("events", "some-run", "--poll-interval", "inf"),
        ("start", "greeter", "{}", "--wait", "--timeout", "inf"),
    ],
)
def test_durations_that_overflow_are_usage_errors(invoke: Invoke, args: tuple[str, ...]) -> None:
    """inf or 1e300 seconds is rejected up front naming the option (exit 2), as nan and
    negative values are, instead of an OverflowError from the tick or the doctor."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[-2]}'" in result.stderr


def test_every_duration_option_is_bounded() -> None:
    """Every float option of every command (its Annotated typer.Option) takes at most
    MAX_SECONDS."""
    import typing

    import typer

    from treadle.hosts.cli import build_app
    from treadle.hosts.cli.common import MAX_SECONDS

    def callbacks(app: typer.Typer) -> Iterator[Any]:
        yield from (c.callback for c in app.registered_commands if c.callback)
        for group in app.registered_groups:
            assert group.typer_instance is not None
            yield from callbacks(group.typer_instance)

    checked, unbounded = [], []
    for callback in callbacks(build_app()):
        for name, hint in typing.get_type_hints(callback, include_extras=True).items():
            if typing.get_origin(hint) is not typing.Annotated:
                continue
            base, *extras = typing.get_args(hint)
            if float not in (base, *typing.get_args(base)):
                continue
            info = next(e for e in extras if isinstance(e, typer.models.OptionInfo))
            checked.append(f"{callback.__name__}.{name}")
            if info.max is None or info.max > MAX_SECONDS:
                unbounded.append(f"{callback.__name__}.{name}")
    assert len(checked) >= 14
    assert unbounded == []


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ('{"name": "a\\u0000b"}', "input.name", "contains a NUL character"),
        ('{"name": "\\ud800"}', "input.name", "contains a lone surrogate"),
    ],
)
def test_unstorable_input_is_one_line_naming_the_field(
    invoke: Invoke, text: str, field: str, problem: str
) -> None:
    """A NUL or a lone surrogate in INPUT: the kernel's one validation line naming the field."""
    line = one_error_line(invoke("start", "greeter", text))
    assert f"{field}: {problem}" in line
    assert "InvalidInputError" in line
