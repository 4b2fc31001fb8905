"""Every python block of README.md and docs/*.md runs as written, or is marked as the
fragment it is (tests/docs/doc_blocks.py has the marks; CONTRIBUTING.md explains them).
A doc that no test runs drifts from the code."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest

from treadle.tests.docs.doc_blocks import (
    PAGES,
    POSTGRES_URL,
    Example,
    blocks_of,
    examples,
    parse_mark,
)
from treadle.tests.docs.projects import run_pytest

EXAMPLES = examples()


def _of(kind: str) -> list[pytest.ParameterSet]:
    return [pytest.param(e, id=e.id) for e in EXAMPLES if e.kind == kind]


def _code(example: Example, request: pytest.FixtureRequest) -> str:
    """The example's code, with its PostgreSQL URLs pointing at a fresh test database."""
    if not example.postgres:
        return example.code
    url = str(request.getfixturevalue("treadle_postgres_url"))
    return POSTGRES_URL.sub(url, example.code)


# ``print(...)  # what it prints``: the comment a reader takes for the output.
_PRINTED = re.compile(r"^\s*print\(.*\)\s+#\s?(?P<said>.*)$", re.M)


@pytest.mark.parametrize("example", _of("program"))
def test_program_runs_as_written(
    example: Example,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A complete program (or a page's sequence of blocks) runs to the end without error,
    in a fresh directory (so ``sqlite:///x.db`` lands there), and each ``print`` line's
    comment starts with what it printed."""
    code = _code(example, request)
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, example.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    # A __main__ module of its own in sys.modules, as a script has: pydantic resolves a
    # model's annotations through sys.modules[cls.__module__] (pytest's is put back after).
    module = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    if compiled.co_flags & inspect.CO_COROUTINE:  # top-level await, as in python -m asyncio
        asyncio.run(eval(compiled, module.__dict__))
    else:
        exec(compiled, module.__dict__)
    said = [m["said"] for m in _PRINTED.finditer(code)]
    if said and len(said) == code.count("print("):  # every print says what it prints
        printed = capsys.readouterr().out.splitlines()
        assert len(printed) == len(said), (printed, said)
        for line, comment in zip(printed, said, strict=True):
            assert comment.startswith(line), f"printed {line!r}, the doc says {comment!r}"


@pytest.mark.parametrize("example", _of("fragment"))
def test_fragment_compiles(example: Example) -> None:
    """A fragment is at least valid Python where it would sit: inside an async body."""
    body = textwrap.indent(example.code, "    ")
    compile(f"async def _fragment():\n{body}    pass\n", example.where, "exec")


@pytest.mark.parametrize("example", _of("pytest"))
def test_pytest_module_passes_in_a_fresh_project(
    example: Example, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A documented test module passes under plain ``python -m pytest`` in a project with
    no pytest configuration (no ``asyncio_mode``), with Treadle's plugin as installed."""
    done = run_pytest(tmp_path, {"test_doc_example.py": _code(example, request)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout, done.stdout
    assert "skipped" not in done.stdout, done.stdout  # a skip would hide a missing mark


def test_the_pages_have_the_blocks_we_expect() -> None:
    """The extractor finds the blocks (a broken fence pattern must not pass by running
    nothing): every page with python examples is covered and some of each kind run."""
    pages = {b.page for page in PAGES for b in blocks_of(page)}
    assert {"README.md", "docs/pipelines.md", "docs/code-workflows.md", "docs/testing.md"} <= (
        pages
    )
    kinds = {e.kind for e in EXAMPLES}
    assert kinds == {"program", "fragment", "pytest"}, kinds
    assert sum(len(e.blocks) for e in EXAMPLES) >= 25


def test_marks_are_checked(tmp_path: Path) -> None:
    """A misspelt mark, or one above a non-python block, is an error, not a silent skip."""
    assert parse_mark("sequence a, postgres", "x") == ("sequence", "a", True, False)
    assert parse_mark("sequence a, pytest", "x") == ("sequence", "a", False, True)
    assert parse_mark("pytest", "x") == ("pytest", None, False, True)
    assert parse_mark("", "x") == ("program", None, False, False)
    with pytest.raises(ValueError, match="unknown doc mark 'fragmnet'"):
        parse_mark("fragmnet", "x")
    with pytest.raises(ValueError, match="takes a name"):
        parse_mark("sequence", "x")
    with pytest.raises(ValueError, match="takes no flags"):
        parse_mark("fragment, postgres", "x")
    page = tmp_path / "page.md"
    page.write_text("<!-- doc: fragment -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="above a bash block"):
        blocks_of(page)
