"""The vocabulary of a code-workflow body's suspension, below ``WorkflowContext``: why a
body unwinds (``Interrupt``, ``Wait``), the branches of ``ctx.all`` / ``ctx.race``
(``Branch``, ``SkippedBranch``, ``CURRENT_BRANCH``), what a parked body yields
(``PARKED``) and the check of a journaled name.

The context, its combinators (``composition``) and the sticky driver (``sticky``) all
use these; none of them is needed to define them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from treadle.kernel.model import JsonValue
from treadle.kernel.text import text_problem


@dataclass(frozen=True)
class Wait:
    """Why a body unwound to suspend: what it waits for, and until when."""

    kind: Literal["sleep", "signal", "update", "review", "retry", "child"]
    position: int
    name: str
    occurrence: int
    until: datetime | None
    signal: str | None = None
    details: dict[str, JsonValue] | None = None
    """Extra wait bookkeeping journaled with it (a review's id, type and reviewers; a
    child's run id, which is not journaled)."""

    def describe(self) -> str:
        """This wait in words, for ``workflow:suspended``'s ``waiting_for`` and the CLI's
        progress line: ``sleep until T``, ``signal NAME (timeout at T)``, ``child RUN``."""
        until = self.until.isoformat(timespec="seconds") if self.until is not None else None
        if self.kind == "sleep":
            return f"sleep until {until}"
        if self.kind == "retry":
            return f"retry of step {self.name} at {until}"
        if self.kind == "child":
            child = (self.details or {}).get("child_run_id")
            return f"child {child}" if child else f"child {self.name}"
        text = f"{self.kind} {self.signal}" if self.kind in ("signal", "update") else "review"
        return f"{text} (timeout at {until})" if until is not None else text


def describe_waits(waits: Sequence[Wait]) -> str | None:
    """Every wait of a suspension in words, joined by ``; `` (``ctx.all`` / ``ctx.race``
    suspend on several at once); ``None`` for none."""
    return "; ".join(wait.describe() for wait in waits) or None


@dataclass(eq=False)
class Interrupt(BaseException):
    """Unwinds a body at a durable boundary. ``suspend``: wait for ``waits``; ``ghost``:
    this execution lost the run (cancelled, lease taken over); ``fatal``: the run must
    fail with ``error`` (non-determinism); ``crash``: storage failed, retry the activation;
    ``cancelled``: the run was cancelled and the body replays only to re-register its
    compensations (``kernel.workflows.saga``); ``continue``: the body called
    ``ctx.continue_as_new``, the run ends and a new run goes on with ``input`` (the JSON
    form, validated against ``version``, the workflow's version for new runs)."""

    reason: Literal["suspend", "ghost", "fatal", "crash", "cancelled", "continue"]
    waits: list[Wait] = field(default_factory=list)
    error: BaseException | None = None
    input: JsonValue = None
    version: str | None = None


@dataclass
class Branch:
    """One argument of ``ctx.all`` / ``ctx.race`` while it runs as its own task: the one
    journal position it reserved, and the waits it unwound with (kept here rather than on
    the context, so a sibling may still reach its own boundary and a race winner may let
    the body carry on)."""

    index: int
    skip: bool = False
    """A race replayed after its decision: reserve the loser's position, never run it."""
    position: int | None = None
    key: str | None = None
    occurrence: int | None = None
    waits: list[Wait] = field(default_factory=list)


class SkippedBranch(BaseException):
    """Unwinds a race loser right after it reserved its position on replay."""


CURRENT_BRANCH: contextvars.ContextVar[Branch | None] = contextvars.ContextVar(
    "treadle_current_branch", default=None
)
"""Task-local: set by ``ctx.all`` / ``ctx.race`` inside the task running one argument."""


def check_name(name: Any, what: str) -> str:
    """``name`` if it is a non-empty string that stores on every backend (it is
    journaled), else ``ValueError`` naming ``what``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    problem = text_problem(name)
    if problem is not None:  # journaled: it must store on every backend
        raise ValueError(f"{what} name {name!r} {problem}")
    return name


PARKED = object()
"""What a parked body yields (``_Park``): ``kernel.workflows.sticky.Body``, the only driver
of a body that may park, stops the activation there instead of handing it to the loop."""
