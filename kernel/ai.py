"""AI calls: what each model request of a run asked, answered, used and cost.

An ``AICall`` is one request to a model (or one tool call, or one item of a provider
batch) made by a stage or a code-workflow step. Calls are *recorded with the outcome of
the attempt that made them*: a stage buffers them like ``ctx.annotate`` and they commit
in the transaction that commits its result (or its failure), a step's in the
transaction that journals the step. So a run's ``total_cost`` and ``total_tokens``
(``AITotals``, kept by the ``AICallLogger`` port) change together with the result the
money bought, and an attempt that failed is counted too, marked ``failed_attempt``.

Recording a call
----------------

``ctx.ai.generate_text`` / ``ctx.ai.generate_object`` record their own calls. Code that
talks to a model some other way (a pydantic-ai agent, a provider SDK, a batch API)
records each call itself, with the facts it knows; Treadle fills in where the call was
made (run, workflow, stage, step, attempt) and when::

    from treadle import AICall

    # in a pipeline stage body (``ctx`` is the StageContext)
    ctx.ai.record(AICall(call_type="agent-request", provider="openai", model="gpt-4o",
                         prompt=messages, response=reply, input_tokens=812,
                         output_tokens=95, cost=Decimal("0.00298"), latency=0.84))

    # in a code workflow, inside a step function (``ctx`` is the WorkflowContext; the
    # call is committed with that step's journal entry, also when the step fails)
    async def ask(question: str) -> str:
        ...                       # call the model
        ctx.ai.record(AICall(call_type="tool", model="gpt-4o", ...))
        return answer

    answer = await ctx.step("ask", ask, question)

In a code workflow ``ctx.ai.record`` must be called while a step runs (it belongs to the
step's attempt; a replay of the body does not run the step again, so the call is not
recorded twice); called from the body itself it raises ``AIRecordError``. The call is
kept in memory until the step's (or stage's) outcome commits: a worker killed before
that commit loses the record along with the result, and the next attempt records its
own call. A ``ghost`` outcome (a cancelled run) still writes its calls, marked as failed
attempts: the money was spent.

Before storing, the ``AIRecording`` policy of the kernel may drop or rewrite prompts and
responses (``record_prompts=False``, ``redact=callable``). Prompts and responses are
never written to logs; large ones are offloaded to the blob store by the SQL adapter like
any other payload.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from treadle.kernel.errors import (
    AIRecordError,
    BudgetExceededError,
    TreadleValidationError,
)
from treadle.kernel.model import JsonValue, evolve

if TYPE_CHECKING:
    from treadle.kernel.model import Run
    from treadle.ports import Transaction
    from treadle.ports.ai_models import AIModelClient

AICallType = Literal["text", "object", "agent-request", "tool", "batch-item", "embedding", "other"]
"""What kind of call: ``ctx.ai.generate_text`` records ``text``, ``generate_object``
``object``; agents record ``agent-request`` (one model request) and ``tool``; provider
batch stages ``batch-item`` (one per prompt of the batch)."""

AIGroupBy = Literal["workflow", "model", "day", "run"]


class AICall(BaseModel):
    """One recorded AI call. A caller fills the call's own facts; the context it is
    recorded in fills ``workflow_run_id``, ``workflow_id``, ``stage_id``, ``step``,
    ``attempt`` and ``created_at``, and storage assigns ``id``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int | None = None
    """Assigned by storage, increasing in recording order."""
    workflow_run_id: str = ""
    workflow_id: str = ""
    stage_id: str | None = None
    """The pipeline stage that made the call (a code workflow's orchestrating stage)."""
    step: str | None = None
    """In a code workflow: the step's journal name and occurrence, ``"ask#2"``."""
    attempt: int = 1
    """The attempt of the stage (or step) that made the call."""
    topic: str | None = None
    """Free label to group calls by purpose (``"summarise"``, ``"classify"``)."""
    call_type: AICallType = "text"
    provider: str | None = None
    model: str
    prompt: JsonValue = None
    """The request: text, or a list of messages (JSON). ``None`` when redacted."""
    response: JsonValue = None
    """The answer: text, the object as JSON, or the provider's message. ``None`` when
    redacted or when the call failed."""
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cost: Decimal | None = None
    """What the call cost in ``currency``; ``None``: no price known for the model."""
    currency: str = "USD"
    latency: timedelta = timedelta(0)
    error: str | None = None
    """The provider's error, for a call that failed."""
    failed_attempt: bool = False
    """The call belongs to an attempt that failed (the stage or step retried or failed,
    or its result was discarded): it cost money but bought no result."""
    created_at: datetime | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def budget(value: object, what: str = "max_cost") -> Decimal:
    """A budget as ``Decimal``: a ``Decimal``, an int or float, or numeric text, finite and
    not negative; ``ValueError`` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise ValueError(f"{what} must be an amount (Decimal, number or text), got {value!r}")
    try:
        amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except ArithmeticError:
        raise ValueError(f"{what} must be an amount, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{what} must be a finite amount of at least 0, got {value!r}")
    return amount


COST_QUANTUM = Decimal("1e-9")
"""Costs are kept to 1e-9 of their currency (the SQL adapter stores whole units of it)."""


def stored_cost(cost: Decimal | None) -> Decimal | None:
    """``cost`` as storage keeps it: rounded to ``COST_QUANTUM``, trailing zeros dropped."""
    if cost is None:
        return None
    try:
        return cost.quantize(COST_QUANTUM).normalize()
    except ArithmeticError:  # beyond the context's precision: keep it as given
        return cost


class AITotals(BaseModel):
    """What a run's AI calls added up to so far, and its budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workflow_run_id: str
    total_cost: Decimal = Decimal(0)
    total_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0
    failed_calls: int = 0
    """Calls of failed attempts (``AICall.failed_attempt``), included in the totals."""
    max_cost: Decimal | None = None
    """The run's budget (``start(..., max_cost=...)`` or the workflow's), if any."""

    def add(self, calls: Sequence[AICall]) -> AITotals:
        """These totals with ``calls`` added (what the adapters store)."""
        cost = (
            self.total_cost + sum((c.cost or Decimal(0) for c in calls), Decimal(0))
        ).normalize()
        return evolve(
            self,
            {
                "total_cost": cost,
                "total_tokens": self.total_tokens + sum(c.total_tokens for c in calls),
                "input_tokens": self.input_tokens + sum(c.input_tokens for c in calls),
                "output_tokens": self.output_tokens + sum(c.output_tokens for c in calls),
                "calls": self.calls + len(calls),
                "failed_calls": self.failed_calls + sum(c.failed_attempt for c in calls),
            },
        )


class AICostRow(BaseModel):
    """One group of ``AICallLogger.aggregate``: calls, tokens and cost of a workflow, a
    model, a day or a run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    calls: int
    failed_calls: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    total_cost: Decimal
    currency: str = "USD"


@dataclass(frozen=True, slots=True)
class AIRecording:
    """What of a call is stored. ``record_prompts=False`` / ``record_responses=False``
    store ``None`` instead; ``redact`` gets every call (after those two) and returns the
    call to store, e.g. with e-mail addresses masked. Tokens, cost and timing are always
    kept."""

    record_prompts: bool = True
    record_responses: bool = True
    redact: Callable[[AICall], AICall] | None = None

    def apply(self, call: AICall) -> AICall:
        update: dict[str, JsonValue] = {}
        if not self.record_prompts and call.prompt is not None:
            update["prompt"] = None
        if not self.record_responses and call.response is not None:
            update["response"] = None
        if update:
            call = evolve(call, update)
        if self.redact is not None:
            call = self.redact(call)
            if not isinstance(call, AICall):
                raise TreadleValidationError(
                    f"AIRecording.redact must return an AICall, got {type(call).__name__}"
                )
        return call


DEFAULT_RECORDING = AIRecording()


class AICallBuffer:
    """The calls one attempt of a stage or step recorded, waiting for its outcome's
    commit. Stamps each call with where and when it was made."""

    __slots__ = (
        "_attempt",
        "_now",
        "_recording",
        "_run_id",
        "_stage_id",
        "_step",
        "_workflow_id",
        "calls",
    )

    def __init__(
        self,
        *,
        run_id: str,
        workflow_id: str,
        stage_id: str | None,
        step: str | None,
        attempt: int,
        now: Callable[[], datetime],
        recording: AIRecording = DEFAULT_RECORDING,
    ) -> None:
        self.calls: list[AICall] = []
        self._run_id = run_id
        self._workflow_id = workflow_id
        self._stage_id = stage_id
        self._step = step
        self._attempt = attempt
        self._now = now
        self._recording = recording

    def record(self, call: AICall) -> AICall:
        """Stamp ``call`` with where it was made, apply the recording policy, buffer it;
        returns the call as it will be stored."""
        if not isinstance(call, AICall):
            raise TreadleValidationError(
                f"ctx.ai.record takes an AICall, got {type(call).__name__}"
            )
        stamped = evolve(
            call,
            {
                "cost": stored_cost(call.cost),
                "id": None,
                "workflow_run_id": self._run_id,
                "workflow_id": self._workflow_id,
                "stage_id": self._stage_id,
                "step": self._step,
                "attempt": self._attempt,
                "created_at": call.created_at or self._now(),
            },
        )
        stored = self._recording.apply(stamped)
        self.calls.append(stored)
        return stored

    @property
    def spent(self) -> Decimal:
        """Cost of the calls buffered so far (not yet committed)."""
        return sum((c.cost or Decimal(0) for c in self.calls), Decimal(0))

    def drain(self, *, failed: bool) -> list[AICall]:
        """The buffered calls, marked ``failed_attempt`` if ``failed``; empties the buffer."""
        calls, self.calls = self.calls, []
        return marked_failed(calls) if failed else calls


def marked_failed(calls: Sequence[AICall]) -> list[AICall]:
    """``calls`` marked as calls of a failed attempt."""
    return [c if c.failed_attempt else evolve(c, {"failed_attempt": True}) for c in calls]


@dataclass(frozen=True, slots=True)
class AIModelRequest:
    """One request ``ctx.ai.generate_*`` hands the ``AIModelClient``."""

    model: object
    """A model name such as ``"openai:gpt-4o"``, or a pydantic-ai ``Model`` instance."""
    prompt: str
    system: str | None = None
    schema: type | None = None
    """``generate_object``: the pydantic model the answer must validate as."""
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class AIModelResponse:
    """The client's answer: the output (text, or an instance of the schema) and what
    the call used and cost."""

    output: object
    model: str
    provider: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal | None = None
    currency: str = "USD"
    response: JsonValue = None
    """The answer as JSON, for the record."""


@dataclass(frozen=True, slots=True)
class AIServices:
    """A kernel's AI set-up (``create_kernel(..., ai=...)``): what of each call is stored,
    and the client ``ctx.ai.generate_*`` calls models through (``adapters/ai``; without
    one, ``generate_*`` builds the pydantic-ai client on first use)."""

    recording: AIRecording = DEFAULT_RECORDING
    client: AIModelClient | None = field(default=None)


DEFAULT_AI = AIServices()

TotalsReader = Callable[[], Awaitable["AITotals | None"]]
"""Reads the run's committed totals and budget (one short transaction)."""


CURRENT_AI_CALLS: contextvars.ContextVar[AICallBuffer | None] = contextvars.ContextVar(
    "treadle_ai_calls", default=None
)
"""The buffer of the stage attempt or step attempt running in this task (set around the
body or the step function; ``asyncio.to_thread`` copies it into sync bodies)."""


def model_label(model: object) -> str:
    """The name a model is recorded under: the string given, or a model object's
    ``model_name`` (pydantic-ai models have one)."""
    if isinstance(model, str):
        return model
    name = getattr(model, "model_name", None)
    return name if isinstance(name, str) and name else type(model).__name__


async def check_budget(totals: TotalsReader, pending: Decimal = Decimal(0)) -> None:
    """``BudgetExceededError`` if the run's committed AI cost plus ``pending`` (this
    attempt's calls, not committed yet) has reached its ``max_cost``."""
    found = await totals()
    if found is None or found.max_cost is None:
        return
    spent = found.total_cost + pending
    if spent >= found.max_cost:
        raise BudgetExceededError(
            f"run {found.workflow_run_id!r} has spent {spent} on AI calls, reaching its "
            f"max_cost of {found.max_cost}: the next call was not made",
            spent=spent,
            max_cost=found.max_cost,
        )


def current_buffer() -> AICallBuffer:
    buffer = CURRENT_AI_CALLS.get()
    if buffer is None:
        raise AIRecordError(
            "ctx.ai.record must be called while a step runs (inside the function given "
            "to ctx.step): a call recorded by the workflow body itself would be recorded "
            "again by every replay"
        )
    return buffer


async def with_ai_totals(tx: Transaction, runs: list[Run]) -> list[Run]:
    """``runs`` with ``total_cost``, ``total_tokens`` and ``max_cost`` filled in from the
    ``AICallLogger`` (one query for all of them)."""
    if not runs:
        return runs
    found = await tx.ai_calls.totals([run.id for run in runs])
    if not found:
        return runs
    filled = []
    for run in runs:
        totals = found.get(run.id)
        if totals is not None:
            run = evolve(
                run,
                {
                    "total_cost": totals.total_cost,
                    "total_tokens": totals.total_tokens,
                    "max_cost": totals.max_cost,
                },
            )
        filled.append(run)
    return filled
