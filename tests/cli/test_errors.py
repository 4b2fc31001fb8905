"""Bad arguments get one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

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
    line = one_error_line(invoke("runs", "list", app=None))
    assert line == "error: RuntimeError: surprise"


@pytest.mark.parametrize("levels", [1_000, 100_000])
def test_deeply_nested_input_is_one_line(invoke: Invoke, levels: int) -> None:
    """JSON nested past what Treadle stores is one line naming INPUT and the limit, not a
    RecursionError (json.loads) or a raw serialisation error."""
    line = one_error_line(invoke("start", "greeter", "[" * levels + "]" * levels))
    assert line.startswith("error: INPUT is nested too deeply")
    assert "128 levels" in line


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ('{"name": "a\\u0000b"}', "input.name", "contains a NUL character"),
        ('{"name": "\\ud800"}', "input.name", "contains a lone surrogate"),
        ('{"name": "x", "extra": NaN}', "input.extra", "nan is not a JSON number"),
    ],
)
def test_unstorable_input_is_one_line_naming_the_field(
    invoke: Invoke, text: str, field: str, problem: str
) -> None:
    """A NUL, a lone surrogate or NaN in INPUT: one validation line naming the field."""
    line = one_error_line(invoke("start", "greeter", text))
    assert f"{field}: {problem}" in line
    assert "InvalidInputError" in line
