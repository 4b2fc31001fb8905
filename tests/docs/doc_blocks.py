"""The python code blocks of README.md and docs/*.md, and what each is meant to be.

The convention (CONTRIBUTING.md, "Docs that run"): the line right above a
```` ```python ```` fence may hold one HTML comment saying what the block is:

- no comment: a complete program, run as written (top-level ``await`` allowed, as in
  ``python -m asyncio``);
- ``<!-- doc: fragment -->``: a piece of a program (a call inside a workflow body, a
  signature); compiled as the body of an ``async def`` so a typo still fails, not run;
- ``<!-- doc: sequence NAME -->``: the page's blocks of one NAME are joined in order and
  run as one program, the way a reader who follows the page builds it;
- ``<!-- doc: pytest -->``: a test module, run by ``python -m pytest`` in a fresh project
  with no pytest configuration; ``<!-- doc: sequence NAME, pytest -->`` on any block of a
  sequence makes the joined sequence such a module;
- ``postgres`` after any of these (``<!-- doc: postgres -->`` for a complete program):
  the program needs PostgreSQL; every ``postgresql+psycopg://...`` URL in it becomes a
  fresh, migrated test database's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*doc:\s*(?P<words>[^>]*?)\s*-->\s*$")
_KINDS = ("fragment", "sequence NAME", "pytest")
POSTGRES_URL = re.compile(r"postgresql\+psycopg://[^\s\"')]+")


@dataclass(frozen=True)
class Block:
    """One fenced python block: where it is, its code, and its mark."""

    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    kind: str  # one of _KINDS
    sequence: str | None = None
    postgres: bool = False
    pytest_module: bool = False


@dataclass
class Example:
    """What one test runs: a program (one block or a joined sequence), a fragment to
    compile, or a pytest module."""

    id: str
    kind: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def code(self) -> str:
        return "\n\n".join(b.code for b in self.blocks)

    @property
    def postgres(self) -> bool:
        return any(b.postgres for b in self.blocks)

    @property
    def where(self) -> str:
        return ", ".join(f"{b.page}:{b.line}" for b in self.blocks)


def parse_mark(words: str, where: str) -> tuple[str, str | None, bool, bool]:
    """``"sequence checkout, postgres"`` -> ("sequence", "checkout", True, False): kind,
    sequence name, needs PostgreSQL, is a pytest module. The kind is
    ``program`` (no word), ``fragment``, ``pytest``, ``sequence NAME`` or
    ``sequence NAME, pytest`` (a sequence that is a test module, kind ``pytest``)."""
    parts = [p.strip() for p in words.split(",") if p.strip()]
    postgres = "postgres" in parts
    pytest_module = "pytest" in parts
    rest = [p for p in parts if p not in ("postgres", "pytest")]
    if len(rest) > 1:
        raise ValueError(f"{where}: one kind per block, got {words!r}")
    kind, _, name = (rest[0] if rest else "").partition(" ")
    if kind not in ("", "fragment", "sequence"):
        raise ValueError(f"{where}: unknown doc mark {kind!r} (known: {', '.join(_KINDS)})")
    if (kind == "sequence") != bool(name.strip()):
        raise ValueError(f"{where}: 'sequence' takes a name, the other kinds none: {words!r}")
    if kind == "fragment" and (pytest_module or postgres):
        raise ValueError(f"{where}: a fragment does not run, so it takes no flags: {words!r}")
    if pytest_module and kind != "sequence":
        kind = "pytest"
    return kind or "program", name.strip() or None, postgres, pytest_module


def blocks_of(page: Path) -> list[Block]:
    """Every ```` ```python ```` block of ``page`` with its mark (an unknown mark, or a
    mark above a fence of another language, is an error rather than silently ignored)."""
    lines = page.read_text().splitlines()
    name = str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, language = fence.groups()
        end = i + 1
        while end < len(lines) and not _FENCE.match(lines[end]):
            end += 1
        mark = _MARK.match(lines[i - 1].strip()) if i > 0 else None
        where = f"{name}:{i + 1}"
        if language == "python":
            kind, sequence, postgres, pytest_module = parse_mark(
                mark["words"] if mark else "", where
            )
            code = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end])
            found.append(Block(name, i + 1, code + "\n", kind, sequence, postgres, pytest_module))
        elif mark is not None:
            raise ValueError(f"{where}: a doc mark above a {language or 'plain'} block")
        i = end + 1
    return found


def examples() -> list[Example]:
    """The tests to run: each block on its own, except sequences, one test per name."""
    out: list[Example] = []
    for page in PAGES:
        sequences: dict[str, Example] = {}
        for block in blocks_of(page):
            if block.sequence is not None:
                key = block.sequence
                if key not in sequences:
                    sequences[key] = Example(f"{block.page}::{key}", "program")
                    out.append(sequences[key])
                sequences[key].blocks.append(block)
                if block.pytest_module:  # one such block makes the whole a test module
                    sequences[key].kind = "pytest"
            else:
                out.append(Example(f"{block.page}:{block.line}", block.kind, [block]))
    return out
